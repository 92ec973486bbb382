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
    let title = escape(title);
    let document = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title></head>\n<body>\n<h1>{title}</h1>\n{body}\n</body></html>\n"
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

/// No caching, no referrer, no framing, no script: for every owner answer.
pub fn with_private_headers(headers: &mut axum::http::HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; form-action 'self'; frame-ancestors 'none'"),
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
