//! The Facebook Graph API client: Page metadata for `page_data.json`.
//!
//! Tokens travel in the `Authorization` header, never in the URL, so no error message or log
//! line that quotes a URL can leak one. Errors are classified for the retry policy: rate limits
//! (codes 4, 17, 32, 613, 80006) wait at least what `X-Business-Use-Case-Usage` or
//! `X-App-Usage` says, token errors (190) stop at once.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

use crate::retry::RetryClass;
use crate::telemetry::GRAPH_SECONDS;

/// The Page fields stored in `page_data.json`; anything else the API returns (a token above
/// all) is dropped.
pub const PAGE_FIELDS: [&str; 13] = [
    "id",
    "name",
    "category",
    "about",
    "website",
    "link",
    "picture",
    "fan_count",
    "verification_status",
    "location",
    "phone",
    "email",
    "created_time",
];

/// Graph API error codes that mean "slow down".
const RATE_LIMIT_CODES: [i64; 5] = [4, 17, 32, 613, 80006];

/// How a Graph API call failed.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("Graph API rate limit (code {code})")]
    RateLimited {
        code: i64,
        retry_after: Option<Duration>,
    },
    /// The token is expired or revoked: the Page needs re-authorisation.
    #[error("Graph API token error (code 190): {message}")]
    TokenInvalid { message: String },
    #[error("Graph API unavailable: {0}")]
    Transient(String),
    #[error("Graph API error: {0}")]
    Permanent(String),
}

impl RetryClass for GraphError {
    fn is_transient(&self) -> bool {
        matches!(
            self,
            GraphError::RateLimited { .. } | GraphError::Transient(_)
        )
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            GraphError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A Graph API client bound to one base URL (FACEBOOK_GRAPH_URL).
#[derive(Debug, Clone)]
pub struct GraphClient {
    /// Shared HTTP connection pool.
    http: reqwest::Client,
    /// Base URL with the API version, without a trailing slash.
    base_url: String,
}

impl GraphClient {
    pub fn new(base_url: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("a plain HTTP client always builds");
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
        }
    }

    /// The Page's metadata, reduced to [`PAGE_FIELDS`].
    pub async fn page_metadata(
        &self,
        page_id: &str,
        token: &SecretString,
    ) -> Result<Value, GraphError> {
        let url = format!("{}/{}", self.base_url, page_id);
        let started = Instant::now();
        let sent = self
            .http
            .get(&url)
            .query(&[("fields", PAGE_FIELDS.join(","))])
            .bearer_auth(token.expose_secret())
            .send()
            .await;
        metrics::histogram!(GRAPH_SECONDS).record(started.elapsed().as_secs_f64());
        let response = sent.map_err(|e| GraphError::Transient(describe_transport_error(&e)))?;
        let status = response.status();
        let retry_after = usage_wait(response.headers());
        let body: Value = response.json().await.map_err(|e| {
            GraphError::Transient(format!(
                "unreadable answer (HTTP {status}): {}",
                describe_transport_error(&e)
            ))
        })?;
        if let Some(error) = body.get("error") {
            return Err(classify_error(status.as_u16(), error, retry_after));
        }
        if !status.is_success() {
            return Err(if status.is_server_error() {
                GraphError::Transient(format!("HTTP {status}"))
            } else {
                GraphError::Permanent(format!("HTTP {status}"))
            });
        }
        Ok(page_data(&body))
    }
}

/// Keeps only the stored Page fields.
pub fn page_data(answer: &Value) -> Value {
    let mut kept = Map::new();
    for field in PAGE_FIELDS {
        if let Some(value) = answer.get(field) {
            kept.insert(field.to_string(), value.clone());
        }
    }
    Value::Object(kept)
}

/// A transport error without its URL (the URL is ours and harmless, but error chains are long).
fn describe_transport_error(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else if error.is_decode() {
        "could not decode the answer"
    } else {
        "request failed"
    };
    kind.to_string()
}

fn classify_error(status: u16, error: &Value, retry_after: Option<Duration>) -> GraphError {
    let code = error.get("code").and_then(Value::as_i64).unwrap_or(0);
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if code == 190 {
        GraphError::TokenInvalid { message }
    } else if RATE_LIMIT_CODES.contains(&code) {
        GraphError::RateLimited { code, retry_after }
    } else if status >= 500 || error.get("is_transient").and_then(Value::as_bool) == Some(true) {
        GraphError::Transient(format!("code {code}: {message}"))
    } else {
        GraphError::Permanent(format!("code {code}: {message}"))
    }
}

/// How long the usage headers say to wait: `estimated_time_to_regain_access` (minutes) in
/// `X-Business-Use-Case-Usage`; when only `X-App-Usage` is over 100%, a minute.
fn usage_wait(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let header_json = |name: &str| -> Option<Value> {
        serde_json::from_str(headers.get(name)?.to_str().ok()?).ok()
    };
    let mut minutes: Option<u64> = None;
    if let Some(Value::Object(businesses)) = header_json("x-business-use-case-usage") {
        for entries in businesses.values() {
            for entry in entries.as_array().into_iter().flatten() {
                if let Some(m) = entry
                    .get("estimated_time_to_regain_access")
                    .and_then(Value::as_u64)
                {
                    minutes = Some(minutes.unwrap_or(0).max(m));
                }
            }
        }
    }
    if let Some(minutes) = minutes.filter(|m| *m > 0) {
        return Some(Duration::from_secs(minutes * 60));
    }
    let app_over = header_json("x-app-usage").is_some_and(|usage| {
        ["call_count", "total_cputime", "total_time"]
            .iter()
            .any(|k| usage.get(k).and_then(Value::as_u64).unwrap_or(0) >= 100)
    });
    app_over.then(|| Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn page_data_drops_tokens_and_unknown_fields() {
        let answer =
            serde_json::json!({"id":"1","name":"Shop","access_token":"EAAB","tasks":["x"]});
        assert_eq!(
            page_data(&answer),
            serde_json::json!({"id":"1","name":"Shop"})
        );
    }

    #[test]
    fn errors_are_classified_by_code() {
        let token = classify_error(
            400,
            &serde_json::json!({"code":190,"message":"expired"}),
            None,
        );
        assert!(matches!(token, GraphError::TokenInvalid { .. }));
        assert!(!token.is_transient());
        let limited = classify_error(
            400,
            &serde_json::json!({"code":80006}),
            Some(Duration::from_secs(60)),
        );
        assert!(limited.is_transient());
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(60)));
        assert!(!classify_error(400, &serde_json::json!({"code":100}), None).is_transient());
        assert!(classify_error(500, &serde_json::json!({"code":2}), None).is_transient());
    }

    #[test]
    fn usage_headers_give_the_wait() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-business-use-case-usage",
            HeaderValue::from_static(r#"{"123":[{"type":"pages","call_count":100,"estimated_time_to_regain_access":3}]}"#),
        );
        assert_eq!(usage_wait(&headers), Some(Duration::from_secs(180)));
        let mut app = HeaderMap::new();
        app.insert(
            "x-app-usage",
            HeaderValue::from_static(r#"{"call_count":100,"total_time":5}"#),
        );
        assert_eq!(usage_wait(&app), Some(Duration::from_secs(60)));
        assert_eq!(usage_wait(&HeaderMap::new()), None);
    }
}
