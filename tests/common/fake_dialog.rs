//! A fake Facebook Login dialog on 127.0.0.1:0 (FACEBOOK_DIALOG_URL = `http://ADDR/dialog/oauth`):
//! it sends the browser straight back to `redirect_uri` with `state` and either the code the test
//! set (the person approved) or `error=access_denied` (they cancelled), as Facebook does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::task::JoinHandle;

/// What the dialog answers next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialogAnswer {
    /// The person approved: this code goes back (see `FakeGraph::login_code`).
    Approve(String),
    /// The person cancelled.
    Deny,
}

#[derive(Default)]
struct DialogState {
    answer: Option<DialogAnswer>,
    /// Every dialog request's query.
    requests: Vec<HashMap<String, String>>,
}

pub struct FakeDialog {
    addr: SocketAddr,
    state: Arc<Mutex<DialogState>>,
    server: JoinHandle<()>,
}

impl FakeDialog {
    pub async fn start() -> Self {
        let state: Arc<Mutex<DialogState>> = Arc::default();
        let app = axum::Router::new()
            .route("/dialog/oauth", axum::routing::get(dialog))
            .with_state(state.clone());
        let (addr, server) = super::serve_on_loopback(app).await;
        Self {
            addr,
            state,
            server,
        }
    }

    /// FACEBOOK_DIALOG_URL for this fake.
    pub fn url(&self) -> String {
        format!("http://{}/dialog/oauth", self.addr)
    }

    /// Sets what the dialog answers from now on.
    pub fn answer(&self, answer: DialogAnswer) {
        self.state.lock().expect("lock").answer = Some(answer);
    }

    /// Every dialog request's query so far.
    pub fn requests(&self) -> Vec<HashMap<String, String>> {
        self.state.lock().expect("lock").requests.clone()
    }
}

impl Drop for FakeDialog {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn dialog(
    State(state): State<Arc<Mutex<DialogState>>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let answer = {
        let mut state = state.lock().expect("lock");
        state.requests.push(query.clone());
        state.answer.clone()
    };
    let Some(redirect) = query.get("redirect_uri") else {
        return (StatusCode::BAD_REQUEST, "no redirect_uri").into_response();
    };
    let mut url = reqwest::Url::parse(redirect).expect("redirect_uri is a URL");
    {
        let mut pairs = url.query_pairs_mut();
        match answer {
            Some(DialogAnswer::Approve(code)) => {
                pairs.append_pair("code", &code);
            }
            Some(DialogAnswer::Deny) | None => {
                pairs
                    .append_pair("error", "access_denied")
                    .append_pair("error_code", "200")
                    .append_pair("error_description", "Permissions error")
                    .append_pair("error_reason", "user_denied");
            }
        }
        pairs.append_pair("state", query.get("state").map_or("", String::as_str));
    }
    let location = format!("{url}#_=_");
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}
