//! Facebook Login, the second step: `/facebook/login` (a session required) sends the owner to
//! Facebook's dialog, the state bound to this browser (`browser_binding.rs`) and this session's
//! user; `/facebook/callback` checks the state, its browser and its user, exchanges the code, then the short-lived token for a long-lived one, checks the permissions,
//! reads every Page of `/me/accounts` and stores each Page's token sealed under this user with
//! one onboarding job per Page in the outbox (one transaction), publishes those jobs and answers
//! at once. The session that started the login
//! is ended and a fresh one issued (so the owner lands on `/connect`).
//!
//! The user token itself is never stored: the Page tokens of a long-lived user token do not
//! expire, and they are all the pipeline needs.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use fbsync_shared::facebook::graph::GraphError;
use fbsync_shared::facebook::login::{AppCredentials, ConnectedPage, LOGIN_SCOPES};
use fbsync_shared::ids::{FacebookUserId, UserUuid};
use fbsync_shared::now_ms;
use fbsync_shared::storage::db::GrantedPage;
use secrecy::SecretString;

use super::browser_binding::BrowserBinding;
use super::error::OwnerError;
use super::page::{escape, redirect_with};
use super::state::{self, Flow};
use super::{OwnerState, session};

/// GET /facebook/login
pub async fn login(
    State(state): State<Arc<OwnerState>>,
    headers: HeaderMap,
) -> Result<Response, OwnerError> {
    let user = session::current_user(&state, &headers)
        .await?
        .ok_or_else(no_session)?;
    let settings = &state.settings;
    let secure = settings.secure_cookies();
    let browser = BrowserBinding::of_request_or_new(&headers, secure);
    let oauth_state = state::issue(
        &settings.state_secret,
        Flow::Facebook,
        user.as_str(),
        &browser,
        now_ms(),
    );
    let mut response = redirect_with(
        &settings.dialog_url,
        "FACEBOOK_DIALOG_URL",
        &[
            ("client_id", &settings.facebook_app_id),
            ("redirect_uri", &settings.facebook_redirect_uri),
            ("scope", &LOGIN_SCOPES.join(",")),
            ("response_type", "code"),
            ("state", &oauth_state),
        ],
    )?;
    response
        .headers_mut()
        .insert(header::SET_COOKIE, browser.cookie(secure));
    Ok(response)
}

fn no_session() -> OwnerError {
    OwnerError::refused(
        "Not signed in",
        "There is no session: open the app from your Shopify admin first (it signs you in), \
         then connect your Facebook Pages.",
    )
}

/// GET /facebook/callback?code&state, or ?error=...&state
pub async fn callback(
    State(state): State<Arc<OwnerState>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Response, OwnerError> {
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(error) = param("error") {
        let body = format!(
            "<p>Facebook Login did not complete: {}.</p>\n\
             <p>Nothing was connected. fbsync needs these permissions to keep your Pages' \
             conversations: {}.</p>\n<p><a href=\"/facebook/login\">Try again</a></p>",
            login_error_in_words(error, param("error_reason")),
            escape(&LOGIN_SCOPES.join(", ")),
        );
        return Err(OwnerError::Page {
            status: StatusCode::BAD_REQUEST,
            title: "Facebook Pages not connected",
            body,
        });
    }
    let settings = &state.settings;
    let secure = settings.secure_cookies();
    let now = now_ms();
    let claims = state::verify(
        &settings.state_secret,
        Flow::Facebook,
        param("state"),
        BrowserBinding::of_request(&headers, secure).as_ref(),
        now,
    )?;
    let user = UserUuid::parse(&claims.subject)
        .map_err(|_| OwnerError::refused("Sign-in refused", "The state names no user."))?;
    // The state must belong to this browser's session: a login started by someone else (a
    // forged link) would otherwise attach the victim's Pages to the attacker's shop.
    if session::current_user(&state, &headers).await? != Some(user.clone()) {
        return Err(state::StateError::WrongSubject("session").into());
    }
    if let Some(reloaded) = state.use_state_once(&claims, &headers, now).await? {
        return Ok(reloaded);
    }
    let code = param("code").filter(|c| !c.is_empty()).ok_or_else(|| {
        OwnerError::refused("Sign-in refused", "Facebook sent no authorization code.")
    })?;
    let (person, pages) = read_pages(&state, code).await?;
    // The Pages, their tokens and their onboarding jobs are stored together: a broker that is
    // away delays the jobs (the outbox relay publishes them), it never loses them.
    let sealed: Vec<GrantedPage> = pages
        .iter()
        .map(|page| GrantedPage {
            page_id: page.page_id.clone(),
            name: page.name.clone(),
            token_sealed: state.cipher.seal(page.page_id.as_str(), &page.token),
        })
        .collect();
    let jobs = state
        .registry
        .connect_pages(&user, &person, &sealed, now_ms())
        .await?;
    let queued = state.publish_now(jobs).await;
    // The login's session ends here (as the seed's); a fresh one, tied to the person whose
    // login it was (their data deletion ends it), shows the status page.
    let cookie = session::start(&state, &headers, &user, Some(&person)).await?;
    tracing::info!(%user, pages = pages.len(), queued, "Facebook Pages connected");
    let mut response = Redirect::to("/connect").into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

/// Why Facebook Login did not complete, in fixed words: Facebook's `error` and `error_reason`
/// pick one; its free-text `error_description` is never shown, as anyone can put text there
/// and have it appear on this origin.
fn login_error_in_words(error: &str, reason: Option<&str>) -> &'static str {
    match (error, reason) {
        (_, Some("user_denied")) | ("access_denied", _) => {
            "the login was cancelled, or the permissions were declined"
        }
        _ => "Facebook reported an error",
    }
}

/// The code exchange, the long-lived token, the permission check, the person and
/// `/me/accounts`; an error page when one of them fails.
async fn read_pages(
    state: &OwnerState,
    code: &str,
) -> Result<(FacebookUserId, Vec<ConnectedPage>), OwnerError> {
    let settings = &state.settings;
    let app = AppCredentials {
        app_id: &settings.facebook_app_id,
        app_secret: &settings.facebook_app_secret,
    };
    let graph = &state.graph;
    let short = graph
        .exchange_code(app, &settings.facebook_redirect_uri, code)
        .await
        .map_err(|e| graph_failure("exchanging the login code", &e))?;
    let long: SecretString = graph
        .long_lived_user_token(app, &short)
        .await
        .map_err(|e| graph_failure("exchanging for a long-lived token", &e))?;
    let missing = graph
        .missing_permissions(&long, &LOGIN_SCOPES)
        .await
        .map_err(|e| graph_failure("reading the granted permissions", &e))?;
    if !missing.is_empty() {
        let body = format!(
            "<p>Facebook Login completed, but these permissions were not granted: \
             <strong>{}</strong>.</p>\n<p>fbsync needs all of them to read and keep your Pages' \
             Messenger conversations. Nothing was connected.</p>\n\
             <p><a href=\"/facebook/login\">Connect again and allow them</a></p>",
            escape(&missing.join(", "))
        );
        return Err(OwnerError::Page {
            status: StatusCode::BAD_REQUEST,
            title: "Permissions missing",
            body,
        });
    }
    let person = graph
        .facebook_user_id(&long)
        .await
        .map_err(|e| graph_failure("reading your Facebook user", &e))?;
    let pages = graph
        .connected_pages(&long)
        .await
        .map_err(|e| graph_failure("reading your Pages", &e))?;
    Ok((person, pages))
}

/// The page for a failed Graph call: what failed, never a token (Graph's messages hold none,
/// and no URL is quoted).
fn graph_failure(what: &str, error: &GraphError) -> OwnerError {
    tracing::warn!(step = what, error = %error, "Facebook Login failed");
    let (status, advice) = match error {
        GraphError::Transient(_) | GraphError::RateLimited { .. } => (
            StatusCode::BAD_GATEWAY,
            "Facebook is not answering right now; please try again in a few minutes.",
        ),
        GraphError::TokenInvalid { .. } | GraphError::Permanent(_) => (
            StatusCode::BAD_REQUEST,
            "Facebook refused the request; please connect again.",
        ),
    };
    let body = format!(
        "<p>Something went wrong while {}. {}</p>\n<p><a href=\"/facebook/login\">Connect again</a></p>",
        escape(what),
        escape(advice)
    );
    OwnerError::Page {
        status,
        title: "Facebook Pages not connected",
        body,
    }
}
