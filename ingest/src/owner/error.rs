//! Why an owner request was not answered as asked, as the two types the routes return: an
//! [`OwnerError`] is a page for a person, in words; a [`CallbackError`] is the JSON answer to a
//! Meta callback. Handlers return `Result<Response, _>` and use `?`; what each error looks like
//! is decided here, once.
//!
//! Invariant: a database or broker error's text is logged, never shown (it may name hosts);
//! the person is told that nothing was lost and to try again.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fbsync_shared::storage::db::DbError;
use serde_json::json;

use super::meta_callbacks::SignedRequestError;
use super::page::{html, problem, with_private_headers};
use super::state::StateError;

/// A page that says what went wrong and what to do.
#[derive(Debug)]
pub enum OwnerError {
    /// Our own database (or the broker) failed: 503, "please try again"; the error is logged.
    Unavailable(String),
    /// The request is refused: `message` (plain text) under `title`.
    Refused {
        status: StatusCode,
        title: &'static str,
        message: String,
    },
    /// A page written for the case: `body` is HTML the caller escaped.
    Page {
        status: StatusCode,
        title: &'static str,
        body: String,
    },
    /// A configuration value does not make a URL: the operator's mistake, said as such.
    Misconfigured { setting: &'static str },
}

impl OwnerError {
    /// A refusal with 400: `message` under `title`.
    pub fn refused(title: &'static str, message: impl Into<String>) -> Self {
        OwnerError::Refused {
            status: StatusCode::BAD_REQUEST,
            title,
            message: message.into(),
        }
    }

    /// A failure of our own: logged, answered 503.
    pub fn unavailable(error: &dyn std::fmt::Display) -> Self {
        OwnerError::Unavailable(error.to_string())
    }
}

impl From<DbError> for OwnerError {
    fn from(error: DbError) -> Self {
        OwnerError::unavailable(&error)
    }
}

/// An OAuth `state` that cannot be accepted refuses the sign-in; the database failing while it
/// is checked is ours.
impl From<StateError> for OwnerError {
    fn from(error: StateError) -> Self {
        match error {
            StateError::Db(e) => OwnerError::from(e),
            refused => OwnerError::refused("Sign-in refused", refused.to_string()),
        }
    }
}

impl IntoResponse for OwnerError {
    fn into_response(self) -> Response {
        match self {
            OwnerError::Unavailable(error) => {
                tracing::error!(%error, "an owner request failed on the database");
                problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Please try again",
                    "The service is busy right now; nothing was lost. Please try again in a minute.",
                )
            }
            OwnerError::Refused {
                status,
                title,
                message,
            } => problem(status, title, &message),
            OwnerError::Page {
                status,
                title,
                body,
            } => html(status, title, &body),
            OwnerError::Misconfigured { setting } => {
                // The operator's mistake: the log names it; the owner is told in their words.
                tracing::error!(
                    setting,
                    "a setting of the owner routes does not make a valid URL"
                );
                problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Please try again later",
                    "fbsync is not set up correctly on the server, so this step cannot go on. \
                     Nothing was changed; the people who run fbsync can see what to fix.",
                )
            }
        }
    }
}

/// Why a Meta callback (deauthorize, data deletion) was not carried out.
#[derive(Debug)]
pub enum CallbackError {
    /// The `signed_request` is missing, forged or unreadable: 400, its reason in JSON.
    Refused(SignedRequestError),
    /// Carrying it out failed on our side: 503, so Meta sends it again; the error is logged.
    Failed(String),
}

impl From<DbError> for CallbackError {
    fn from(error: DbError) -> Self {
        CallbackError::Failed(error.to_string())
    }
}

impl IntoResponse for CallbackError {
    fn into_response(self) -> Response {
        let (status, answer) = match self {
            CallbackError::Refused(reason) => {
                tracing::warn!(%reason, "a Meta callback was refused");
                (
                    StatusCode::BAD_REQUEST,
                    json!({"error": reason.to_string()}),
                )
            }
            CallbackError::Failed(error) => {
                tracing::error!(%error, "a Meta callback could not be carried out");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": "temporarily unavailable; please retry"}),
                )
            }
        };
        let mut response = (status, axum::Json(answer)).into_response();
        with_private_headers(response.headers_mut());
        response
    }
}
