//! Facebook Login's Graph API calls: the code exchange, the long-lived user token, the person's
//! id and granted permissions, their Pages (`/me/accounts`, every `paging.next` followed) and a
//! Page's app subscription.
//!
//! Everything goes through [`GraphClient`]'s one request path: user and Page tokens in the
//! `Authorization` header; the exchanges, which carry the app secret (and the short-lived
//! token), as the GETs with query parameters that Meta documents ("Manually Build a Login
//! Flow" and "Long-Lived Access Tokens", read 2026-12-04), whose URLs are never logged. Tokens
//! come back as [`SecretString`]s and are never logged.

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::graph::{GraphClient, GraphError};
use crate::ids::{FacebookUserId, PageId};

/// The permissions Facebook Login asks for.
pub const LOGIN_SCOPES: [&str; 4] = [
    "pages_messaging",
    "pages_show_list",
    "pages_manage_metadata",
    "pages_read_engagement",
];

/// The webhook fields a Page is subscribed to unless FACEBOOK_WEBHOOK_FIELDS says otherwise:
/// every Messenger field a shop's conversations consist of, and the Page profile fields the
/// seed uses (`name`, `category`). Checked against Meta's field list (the Messenger Platform's
/// webhook reference, read 2026-12-04); the README's table says what each carries, and why
/// `response_feedback` (it adds feedback buttons to every message the app sends) and
/// `messaging_game_plays` (Instant Games) are left out.
pub const SUBSCRIBED_FIELDS: [&str; 17] = [
    "messages",
    "message_echoes",
    "message_edits",
    "message_reactions",
    "message_deliveries",
    "message_reads",
    "messaging_postbacks",
    "messaging_referrals",
    "messaging_optins",
    "messaging_handovers",
    "standby",
    "messaging_policy_enforcement",
    "messaging_account_linking",
    "messaging_feedback",
    "send_cart",
    "name",
    "category",
];

/// Most `/me/accounts` pages followed: far beyond any real owner, and a bound on a link loop.
const MAX_ACCOUNT_PAGES: usize = 1000;

/// The app's credentials for the exchanges.
#[derive(Debug, Clone, Copy)]
pub struct AppCredentials<'a> {
    /// FACEBOOK_APP_ID, the exchanges' `client_id`.
    pub app_id: &'a str,
    /// FACEBOOK_APP_SECRET, the exchanges' `client_secret`.
    pub app_secret: &'a SecretString,
}

/// One Page of `/me/accounts`.
#[derive(Debug, Clone)]
pub struct ConnectedPage {
    /// The Page's id, checked.
    pub page_id: PageId,
    /// Shown on the owner's status page.
    pub name: String,
    /// The Page token (from a long-lived user token: it does not expire).
    pub token: SecretString,
}

/// A token out of an `{"access_token": ...}` answer.
fn access_token(answer: &Value) -> Result<SecretString, GraphError> {
    answer
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|token| !token.is_empty())
        .map(|token| SecretString::from(token.to_string()))
        .ok_or_else(|| GraphError::Permanent("the answer holds no access token".into()))
}

impl GraphClient {
    /// Exchanges the dialog's `code` for a (short-lived) user token.
    pub async fn exchange_code(
        &self,
        app: AppCredentials<'_>,
        redirect_uri: &str,
        code: &str,
    ) -> Result<SecretString, GraphError> {
        let query = [
            ("client_id", app.app_id),
            ("redirect_uri", redirect_uri),
            ("client_secret", app.app_secret.expose_secret()),
            ("code", code),
        ];
        let answer = self
            .get_without_token(&self.url("oauth/access_token"), &query)
            .await?;
        access_token(&answer)
    }

    /// Exchanges a short-lived user token for a long-lived one (`fb_exchange_token`), whose
    /// Page tokens do not expire.
    pub async fn long_lived_user_token(
        &self,
        app: AppCredentials<'_>,
        short_lived: &SecretString,
    ) -> Result<SecretString, GraphError> {
        let query = [
            ("grant_type", "fb_exchange_token"),
            ("client_id", app.app_id),
            ("client_secret", app.app_secret.expose_secret()),
            ("fb_exchange_token", short_lived.expose_secret()),
        ];
        let answer = self
            .get_without_token(&self.url("oauth/access_token"), &query)
            .await?;
        access_token(&answer)
    }

    /// The app-scoped id of the person (`/me`): Meta's deauthorize and data-deletion callbacks
    /// name them by it.
    pub async fn facebook_user_id(
        &self,
        user_token: &SecretString,
    ) -> Result<FacebookUserId, GraphError> {
        let answer = self
            .get(&self.url("me"), &[("fields", "id")], user_token)
            .await?;
        answer
            .get("id")
            .and_then(Value::as_str)
            .and_then(|id| FacebookUserId::parse(id).ok())
            .ok_or_else(|| GraphError::Permanent("/me has no valid id".into()))
    }

    /// The permissions of `wanted` the person has not granted (declined, or never asked).
    pub async fn missing_permissions(
        &self,
        user_token: &SecretString,
        wanted: &[&str],
    ) -> Result<Vec<String>, GraphError> {
        let answer = self
            .get(&self.url("me/permissions"), &[], user_token)
            .await?;
        let granted: Vec<&str> = answer
            .get("data")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|entry| entry.get("status").and_then(Value::as_str) == Some("granted"))
            .filter_map(|entry| entry.get("permission").and_then(Value::as_str))
            .collect();
        Ok(wanted
            .iter()
            .filter(|permission| !granted.contains(permission))
            .map(|permission| permission.to_string())
            .collect())
    }

    /// Every Page of the person (`/me/accounts`), following `paging.next` until it is absent.
    /// An entry without a valid id or a token is skipped (Facebook omits the token of a Page
    /// the person cannot manage).
    pub async fn connected_pages(
        &self,
        user_token: &SecretString,
    ) -> Result<Vec<ConnectedPage>, GraphError> {
        let mut pages = Vec::new();
        let mut url = self.url("me/accounts");
        let mut query: &[(&str, &str)] = &[("fields", "id,name,access_token"), ("limit", "100")];
        for _ in 0..MAX_ACCOUNT_PAGES {
            let answer = self.get(&url, query, user_token).await?;
            for entry in answer
                .get("data")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let id = entry.get("id").and_then(Value::as_str).unwrap_or_default();
                let (Ok(page_id), Ok(token)) = (PageId::parse(id), access_token(entry)) else {
                    tracing::warn!(
                        page_id = id,
                        "a Page of /me/accounts has no usable id or token; skipped"
                    );
                    continue;
                };
                let name = entry
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                pages.push(ConnectedPage {
                    page_id,
                    name,
                    token,
                });
            }
            match answer.pointer("/paging/next").and_then(Value::as_str) {
                Some(next) => {
                    // The link carries the query (and Graph puts the token in it: the client
                    // drops it).
                    url = next.to_string();
                    query = &[];
                }
                None => return Ok(pages),
            }
        }
        Err(GraphError::Permanent(format!(
            "/me/accounts has more than {MAX_ACCOUNT_PAGES} pages of results"
        )))
    }

    /// Whether the app is subscribed to the Page's webhooks with every one of `fields`. The app
    /// is recognised by `app_id`; without it any subscribed app seen through the Page token
    /// (which only our app holds) counts.
    pub async fn is_app_subscribed(
        &self,
        page_id: &PageId,
        page_token: &SecretString,
        app_id: Option<&str>,
        fields: &[String],
    ) -> Result<bool, GraphError> {
        let wanted = fields;
        let url = self.url(&format!("{page_id}/subscribed_apps"));
        let answer = self.get(&url, &[], page_token).await?;
        let subscribed = answer
            .get("data")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|app| app_id.is_none_or(|id| app.get("id").and_then(Value::as_str) == Some(id)))
            .any(|app| {
                let fields: Vec<&str> = app
                    .get("subscribed_fields")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                wanted.iter().all(|field| fields.contains(&field.as_str()))
            });
        Ok(subscribed)
    }

    /// Subscribes the app to the Page's webhooks with `fields` (the whole list: Graph replaces
    /// the app's fields with it).
    pub async fn subscribe_app(
        &self,
        page_id: &PageId,
        page_token: &SecretString,
        fields: &[String],
    ) -> Result<(), GraphError> {
        let url = self.url(&format!("{page_id}/subscribed_apps"));
        let fields = fields.join(",");
        let answer = self
            .post_form(&url, &[("subscribed_fields", &fields)], page_token)
            .await?;
        if answer.get("success").and_then(Value::as_bool) == Some(true) {
            Ok(())
        } else {
            Err(GraphError::Permanent(
                "the subscription was not confirmed (no success: true)".into(),
            ))
        }
    }
}
