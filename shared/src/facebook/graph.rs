//! The Facebook Graph API client: one request path (token in the header, errors classified)
//! for every call, and Page metadata for `page_data.json`.
//!
//! Tokens travel in the `Authorization` header, never in the URL (only Facebook Login's
//! exchanges put the app secret in one, as Meta documents them), and no error message or log
//! line quotes a URL, so none can leak a secret. Errors are classified for the retry policy: rate limits
//! (codes 4, 17, 32, 613, 80006) wait at least what `X-Business-Use-Case-Usage` or
//! `X-App-Usage` says, token errors (190) stop at once.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

use crate::retry::RetryClass;
use crate::telemetry::{GRAPH_CALLS, GRAPH_SECONDS};

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
        // Redirects are not followed: a redirected exchange would carry the app secret to
        // wherever the answer points. The Graph API does not redirect its API calls.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
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
        let fields = PAGE_FIELDS.join(",");
        let answer = self
            .get(&self.url(page_id), &[("fields", &fields)], token)
            .await?;
        Ok(page_data(&answer))
    }

    /// The URL of `path` (no leading slash) under the base URL.
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base_url, path.trim_start_matches('/'))
    }

    /// GETs `url` (from [`GraphClient::url`], or a `paging.next` link of an earlier answer)
    /// with `query` added, the token in the header, and returns the answer's JSON.
    pub async fn get(
        &self,
        url: &str,
        query: &[(&str, &str)],
        token: &SecretString,
    ) -> Result<Value, GraphError> {
        let url = self.checked_url(url)?;
        self.send(self.http.get(url).query(query), Some(token))
            .await
    }

    /// POSTs a form to `url` with the token in the header, and returns the answer's JSON.
    pub async fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        token: &SecretString,
    ) -> Result<Value, GraphError> {
        let url = self.checked_url(url)?;
        self.send(self.http.post(url).form(form), Some(token)).await
    }

    /// A `paging.next` link as it may be kept (in the database, to resume a poll): on the
    /// Graph API's origin and without a token.
    pub fn paging_link(&self, url: &str) -> Result<String, GraphError> {
        Ok(self.checked_url(url)?.to_string())
    }

    /// Parses `url` and makes sure it is on the Graph API's own origin (a `paging.next` link
    /// elsewhere would carry the token away), without an `access_token` parameter: Facebook
    /// writes the token into its `paging.next` links, and a token in a URL ends up in logs.
    fn checked_url(&self, url: &str) -> Result<reqwest::Url, GraphError> {
        let base = reqwest::Url::parse(&self.base_url)
            .map_err(|e| GraphError::Permanent(format!("FACEBOOK_GRAPH_URL is not a URL: {e}")))?;
        let mut parsed = reqwest::Url::parse(url)
            .map_err(|_| GraphError::Permanent("a paging link is not a URL".into()))?;
        if parsed.origin() != base.origin() {
            return Err(GraphError::Permanent(format!(
                "a paging link points outside the Graph API ({})",
                parsed.origin().ascii_serialization()
            )));
        }
        if parsed.query_pairs().any(|(k, _)| k == "access_token") {
            let kept: Vec<(String, String)> = parsed
                .query_pairs()
                .filter(|(k, _)| k != "access_token")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            parsed.query_pairs_mut().clear().extend_pairs(kept);
        }
        Ok(parsed)
    }

    /// Sends one request (with the token as bearer, when there is one), classifies its
    /// failure and counts its outcome.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        token: Option<&SecretString>,
    ) -> Result<Value, GraphError> {
        let result = self.send_once(request, token).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(GraphError::RateLimited { .. }) => "rate_limited",
            Err(GraphError::TokenInvalid { .. }) => "token_error",
            Err(GraphError::Transient(_)) => "transient",
            Err(GraphError::Permanent(_)) => "error",
        };
        metrics::counter!(GRAPH_CALLS, "outcome" => outcome).increment(1);
        result
    }

    async fn send_once(
        &self,
        request: reqwest::RequestBuilder,
        token: Option<&SecretString>,
    ) -> Result<Value, GraphError> {
        let request = match token {
            Some(token) => request.bearer_auth(token.expose_secret()),
            None => request,
        };
        let started = Instant::now();
        let sent = request.send().await;
        metrics::histogram!(GRAPH_SECONDS).record(started.elapsed().as_secs_f64());
        let response = sent.map_err(|e| GraphError::Transient(describe_transport_error(&e)))?;
        let status = response.status();
        if status.is_redirection() {
            return Err(GraphError::Permanent(format!(
                "the Graph API answered a redirect (HTTP {status}), which is not followed"
            )));
        }
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
        Ok(body)
    }

    /// GETs `url` with `query` and no bearer token: Facebook Login's code and token exchanges,
    /// which Meta documents as GETs authenticated by the app secret among the query parameters.
    /// That URL is never logged, and a failure is described without it
    /// (`describe_transport_error`), so the secret stays out of every log line.
    pub async fn get_without_token(
        &self,
        url: &str,
        query: &[(&str, &str)],
    ) -> Result<Value, GraphError> {
        let url = self.checked_url(url)?;
        self.send(self.http.get(url).query(query), None).await
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

/// A transport error without its URL: the exchanges' URLs carry the app secret (and error
/// chains are long).
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A 307 on the code exchange is not followed: the exchange fails, and the place the
    /// redirect names never hears of it (it would have received the app secret again).
    #[tokio::test]
    async fn a_redirected_exchange_is_not_followed() {
        let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let elsewhere_addr = elsewhere.local_addr().expect("addr");
        let graph = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let graph_addr = graph.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut stream, _) = graph.accept().await.expect("accept");
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            let answer = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{elsewhere_addr}/steal\r\nContent-Length: 0\r\n\r\n"
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        });
        let client = GraphClient::new(&format!("http://{graph_addr}/v25.0"));
        let secret = SecretString::from("app-secret".to_string());
        let app = crate::facebook::login::AppCredentials {
            app_id: "1",
            app_secret: &secret,
        };
        let refused = client
            .exchange_code(app, "https://x.example/facebook/callback", "c")
            .await;
        assert!(
            matches!(&refused, Err(GraphError::Permanent(m)) if m.contains("redirect")),
            "{refused:?}"
        );
        let reached = tokio::time::timeout(Duration::from_millis(300), elsewhere.accept()).await;
        assert!(reached.is_err(), "the redirect was followed");
    }

    #[test]
    fn paging_links_lose_their_token_and_never_leave_the_graph_api() {
        let graph = GraphClient::new("http://127.0.0.1:9/v25.0/");
        let next = graph
            .checked_url(
                "http://127.0.0.1:9/v25.0/1/conversations?access_token=EAAB&after=QV&limit=2",
            )
            .expect("same origin");
        assert_eq!(
            next.as_str(),
            "http://127.0.0.1:9/v25.0/1/conversations?after=QV&limit=2"
        );
        assert!(matches!(
            graph.checked_url("https://evil.example/v25.0/1/conversations?after=QV"),
            Err(GraphError::Permanent(_))
        ));
        assert_eq!(
            graph.url("1/conversations"),
            "http://127.0.0.1:9/v25.0/1/conversations"
        );
    }

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
