//! The owner's pages: plain server-rendered HTML (no script, no framework), every value
//! escaped, never cached, never leaking the URL (which may hold an OAuth code) as a referrer.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::OwnerError;

/// `text` safe inside HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A redirect to `base` with `query` added (an OAuth authorize step); a `base` that is not a
/// URL is the configuration named by `setting`, answered as such.
pub fn redirect_with(
    base: &str,
    setting: &'static str,
    query: &[(&str, &str)],
) -> Result<Response, OwnerError> {
    let mut url = reqwest::Url::parse(base).map_err(|_| OwnerError::Misconfigured { setting })?;
    url.query_pairs_mut().extend_pairs(query);
    Ok(axum::response::Redirect::to(url.as_str()).into_response())
}

/// A whole page: `title` (escaped here) and `body`, HTML the caller escaped.
pub fn html(status: StatusCode, title: &str, body: &str) -> Response {
    document(status, title, body, None)
}

/// How a page reloads itself: after `secs`, from `path` (named, not implied: Facebook's
/// redirect leaves a `#_=_` fragment, and a refresh to the same URL with a fragment reloads
/// nothing).
pub struct Refresh {
    pub secs: u32,
    pub path: &'static str,
}

/// A whole page that reloads itself when `refresh` says so (a meta refresh: the owner's pages
/// run no script), with the one stylesheet.
pub fn document(status: StatusCode, title: &str, body: &str, refresh: Option<Refresh>) -> Response {
    let title = escape(title);
    let refresh = refresh
        .map(|Refresh { secs, path }| {
            format!("<meta http-equiv=\"refresh\" content=\"{secs}; url={path}\">")
        })
        .unwrap_or_default();
    let document = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">{refresh}\
         <link rel=\"stylesheet\" href=\"{STYLESHEET_PATH}\">\
         <title>{title}</title></head>\n<body>\n<main>\n<h1>{title}</h1>\n{body}\n</main>\n\
         </body></html>\n"
    );
    let mut response = (status, document).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    with_private_headers(headers);
    response
}

/// Where the stylesheet is served.
pub const STYLESHEET_PATH: &str = "/fbsync.css";

/// The owner pages' one stylesheet: readable from a 390 px phone (nothing wider than the
/// screen; a Page's facts stack) to a desktop (a narrow column), with contrast above 4.5:1.
const STYLESHEET: &str = include_str!("fbsync.css");

/// GET /fbsync.css
pub async fn stylesheet() -> Response {
    let mut response = STYLESHEET.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    response
}

/// A page that says what went wrong and what to do, in words: `message` is plain text; the
/// way on is a link to start again (`/` says how, or goes on to `/connect` when signed in).
pub fn problem(status: StatusCode, title: &str, message: &str) -> Response {
    html(
        status,
        title,
        &format!(
            "<p>{}</p>\n<p><a id=\"start-again\" href=\"/\">Start again</a></p>",
            escape(message)
        ),
    )
}

/// No caching, no referrer, no framing, no script, styles from this origin only: for every
/// owner answer.
pub fn with_private_headers(headers: &mut axum::http::HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_escaped() {
        assert_eq!(
            escape("<script>\"a\" & 'b'</script>"),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
    }
}
