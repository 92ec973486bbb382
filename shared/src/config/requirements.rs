//! What only some roles require, checked by the role at start into a value with nothing
//! optional left: ingest's webhook secrets, the token cipher, the object store's location and
//! the owner routes' settings. Each check reports every problem it finds at once.

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};

use super::problems::Problems;
use super::{ConditionalWrites, Settings};
use crate::crypto::TokenCipher;

impl Settings {
    /// Ingest's secrets, or why they are missing.
    pub fn webhook_secrets(&self) -> Result<WebhookSecrets, Vec<String>> {
        let mut problems = Problems::default();
        let app_secret = problems.required(
            &self.facebook.app_secret,
            "FACEBOOK_APP_SECRET",
            "ingest needs it to verify webhook signatures",
        );
        let verify_token = problems.required(
            &self.facebook.verify_token,
            "FACEBOOK_VERIFY_TOKEN",
            "ingest needs it for the subscription handshake",
        );
        let (Some(app_secret), Some(verify_token)) = (app_secret, verify_token) else {
            return Err(problems.into_lines());
        };
        Ok(WebhookSecrets {
            app_secret,
            verify_token,
        })
    }

    /// The cipher that seals Page tokens, from TOKEN_ENCRYPTION_KEY (32 bytes, base64).
    pub fn token_cipher(&self) -> Result<TokenCipher, Vec<String>> {
        let mut problems = Problems::default();
        let Some(key) = problems.required(
            &self.token_encryption_key,
            "TOKEN_ENCRYPTION_KEY",
            "page tokens are encrypted at rest (32 bytes, base64; `openssl rand -base64 32`)",
        ) else {
            return Err(problems.into_lines());
        };
        TokenCipher::from_base64(&key)
            .map_err(|e| vec![format!("TOKEN_ENCRYPTION_KEY is malformed: {e}")])
    }

    /// Where objects go: the S3-compatible store when SPACES_ENDPOINT is set (its bucket and
    /// keys then required), else the local directory.
    pub fn store_location(&self) -> Result<StoreLocation, Vec<String>> {
        const WHY: &str = "SPACES_ENDPOINT is set";
        let storage = &self.storage;
        let Some(endpoint) = &storage.endpoint else {
            return Ok(StoreLocation::Local(storage.data_dir.clone()));
        };
        let mut problems = Problems::default();
        let bucket = problems.required(&storage.bucket, "SPACES_BUCKET", WHY);
        let access_key = problems.required(&storage.access_key, "SPACES_API_KEY", WHY);
        let secret_key = problems.required(&storage.secret_key, "SPACES_API_SECRET", WHY);
        let (Some(bucket), Some(access_key), Some(secret_key)) = (bucket, access_key, secret_key)
        else {
            return Err(problems.into_lines());
        };
        Ok(StoreLocation::S3(S3Target {
            endpoint: endpoint.clone(),
            bucket,
            region: storage.region.clone(),
            access_key,
            secret_key,
            send_write_conditions: storage.conditional_writes != ConditionalWrites::Off,
        }))
    }

    /// The owner routes' settings (Shopify OAuth, Facebook Login, the Meta callbacks): `None`
    /// when none of their required variables is set (ingest then serves the webhook only);
    /// every missing one when only some are.
    pub fn owner_settings(&self) -> Result<Option<OwnerSettings>, Vec<String>> {
        const WHY: &str = "the owner routes need it (the other owner settings are set)";
        let facebook = &self.facebook;
        let shopify = &self.shopify;
        let any_set = facebook.app_id.is_some()
            || facebook.redirect_uri.is_some()
            || shopify.api_key.is_some()
            || shopify.api_secret.is_some()
            || shopify.redirect_uri.is_some()
            || self.state_secret.is_some();
        if !any_set {
            return Ok(None);
        }
        let mut problems = Problems::default();
        let app_id = problems
            .required(&facebook.app_id, "FACEBOOK_APP_ID", WHY)
            .and_then(|id| problems.take(app_id(id)));
        let app_secret = problems.required(&facebook.app_secret, "FACEBOOK_APP_SECRET", WHY);
        let facebook_redirect = problems
            .required(&facebook.redirect_uri, "FACEBOOK_REDIRECT_URI", WHY)
            .and_then(|uri| {
                problems.take(redirect_uri(
                    "FACEBOOK_REDIRECT_URI",
                    uri,
                    FACEBOOK_CALLBACK_PATH,
                ))
            });
        let api_key = problems.required(&shopify.api_key, "SHOPIFY_API_KEY", WHY);
        let api_secret = problems.required(&shopify.api_secret, "SHOPIFY_API_SECRET", WHY);
        let shopify_redirect = problems
            .required(&shopify.redirect_uri, "SHOPIFY_REDIRECT_URI", WHY)
            .and_then(|uri| {
                problems.take(redirect_uri(
                    "SHOPIFY_REDIRECT_URI",
                    uri,
                    SHOPIFY_CALLBACK_PATH,
                ))
            });
        let state_secret = problems
            .required(&self.state_secret, "STATE_TOKEN_SECRET", WHY)
            .and_then(|secret| problems.take(state_secret(secret)));
        let (
            Some(app_id),
            Some(app_secret),
            Some(facebook_redirect),
            Some(api_key),
            Some(api_secret),
            Some(shopify_redirect),
            Some(state_secret),
        ) = (
            app_id,
            app_secret,
            facebook_redirect,
            api_key,
            api_secret,
            shopify_redirect,
            state_secret,
        )
        else {
            return Err(problems.into_lines());
        };
        Ok(Some(OwnerSettings {
            facebook_app_id: app_id,
            facebook_app_secret: app_secret,
            facebook_redirect_uri: facebook_redirect,
            dialog_url: facebook.dialog_url.clone(),
            graph_url: facebook.graph_url.clone(),
            shopify_api_key: api_key,
            shopify_api_secret: api_secret,
            shopify_redirect_uri: shopify_redirect,
            shopify_scopes: shopify.scopes.clone(),
            shopify_admin_url: shopify.admin_url.clone(),
            state_secret,
        }))
    }
}

/// A Facebook app id (digits), or the line that says it is not.
fn app_id(id: String) -> Result<String, Vec<String>> {
    if !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_digit()) {
        Ok(id)
    } else {
        Err(vec![format!(
            "FACEBOOK_APP_ID={id:?} is not an app id (digits)"
        )])
    }
}

/// A state-signing secret long enough to sign with, or the line that says it is not.
fn state_secret(secret: SecretString) -> Result<SecretString, Vec<String>> {
    if secret.expose_secret().len() >= 16 {
        Ok(secret)
    } else {
        Err(vec![
            "STATE_TOKEN_SECRET must be at least 16 characters".to_string(),
        ])
    }
}

/// Where ingest serves Facebook Login's redirect: `FACEBOOK_REDIRECT_URI`'s path.
pub const FACEBOOK_CALLBACK_PATH: &str = "/facebook/callback";
/// Where ingest serves Shopify's OAuth redirect: `SHOPIFY_REDIRECT_URI`'s path.
pub const SHOPIFY_CALLBACK_PATH: &str = "/shopify/callback";

/// An absolute http(s) URL whose path is `path` (the route ingest serves it on), or the line
/// that says what is wrong with it.
fn redirect_uri(name: &str, uri: String, path: &str) -> Result<String, Vec<String>> {
    let Some(rest) = uri
        .strip_prefix("https://")
        .or_else(|| uri.strip_prefix("http://"))
    else {
        return Err(vec![format!(
            "{name}={uri:?} must be an absolute http:// or https:// URL"
        )]);
    };
    let after_host = rest.find(['/', '?', '#']).map_or("", |at| &rest[at..]);
    let served = after_host.split(['?', '#']).next().unwrap_or_default();
    if served == path {
        Ok(uri)
    } else {
        Err(vec![format!(
            "{name}={uri:?} must end in the path {path}: that is where fbsync serves the redirect (the provider sends the owner back to exactly this URL)"
        )])
    }
}

/// Everything the owner routes need, all present.
#[derive(Debug, Clone)]
pub struct OwnerSettings {
    /// Facebook Login's `client_id`.
    pub facebook_app_id: String,
    /// Authenticates the code exchanges and checks Meta's `signed_request`s.
    pub facebook_app_secret: SecretString,
    /// `/facebook/callback` as Facebook reaches it; its origin is also where the data-deletion
    /// status pages are linked from.
    pub facebook_redirect_uri: String,
    /// Facebook Login's dialog.
    pub dialog_url: String,
    /// The Graph API's base URL.
    pub graph_url: String,
    /// The Shopify app's `client_id`.
    pub shopify_api_key: String,
    /// Checks Shopify's `hmac` and authenticates the code exchange.
    pub shopify_api_secret: SecretString,
    /// `/shopify/callback` as Shopify reaches it.
    pub shopify_redirect_uri: String,
    /// The scopes asked of a shop.
    pub shopify_scopes: String,
    /// The shop's admin base URL with `{shop}` in it.
    pub shopify_admin_url: String,
    /// Signs OAuth `state`s.
    pub state_secret: SecretString,
}

impl OwnerSettings {
    /// Cookies are `Secure` when the owner reaches us over https.
    pub fn secure_cookies(&self) -> bool {
        self.facebook_redirect_uri.starts_with("https://")
            && self.shopify_redirect_uri.starts_with("https://")
    }
}

/// Ingest's secrets, both present.
#[derive(Debug, Clone)]
pub struct WebhookSecrets {
    /// Signs every webhook delivery; ingest cannot accept anything without it.
    pub app_secret: SecretString,
    /// Echoed by Facebook in the subscription handshake.
    pub verify_token: SecretString,
}

/// Where the object store is, with everything it needs present.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    /// A local directory with the bucket's layout (no SPACES_ENDPOINT).
    Local(PathBuf),
    /// Spaces or another S3-compatible store.
    S3(S3Target),
}

/// An S3-compatible store's coordinates.
#[derive(Debug, Clone)]
pub struct S3Target {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key: SecretString,
    pub secret_key: SecretString,
    /// Send If-Match / If-None-Match on writes (not with SPACES_CONDITIONAL_WRITES=off, for a
    /// store that rejects them).
    pub send_write_conditions: bool,
}
