//! A fake Facebook Graph API on 127.0.0.1:0, answering in the documented shapes:
//! - `GET /{page_id}?fields=...`: the Page's metadata, a page access token included on purpose
//!   (the app must never store it; `fields` is not used to trim the answer);
//! - `GET /{page_id}/conversations`: the Page's conversations, newest update first, in pages
//!   (the size tests set), each with its newest messages nested; `paging.next` links (carrying
//!   `access_token=`, as Facebook writes them) at both levels, `GET /{conversation}/messages`
//!   for the older messages, and `GET /{message}` for one message's details. Only a
//!   conversation's 20 most recent messages have details: older ones are listed with `id` and
//!   `created_time` only, and asking for their details answers error 100.
//!
//! - Facebook Login (its own section at the end): `GET /oauth/access_token` with query
//!   parameters, as Meta documents it (the code, then `fb_exchange_token`; any other method is
//!   refused), `GET /me`, `/me/permissions`, `/me/accounts` (paged, `paging.next`
//!   carrying the token as Graph's links do), `GET/POST /{page_id}/subscribed_apps` (scripted
//!   failures of the Page apply to it too).
//!
//! A version prefix (`/v25.0/{page_id}`) is accepted too. The token is read from
//! `Authorization: Bearer` (or `access_token=`); without one the answer is error 104, for a Page
//! never set error 100. Tests script failures per Page, consumed in order before normal answers,
//! hold a Page's next answer back until they release it (a slow Graph call), and read back every
//! call that was made.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// `created_time` of every fake Page, in Graph's format.
pub const CREATED_TIME: &str = "2022-07-12T19:11:07+0000";

/// An answer the fake gives instead of the normal one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A rate-limit error: `code` is one of 4, 17, 32, 613, 80006 (4 and 17 come with HTTP 403,
    /// the others with 400), with `X-Business-Use-Case-Usage` saying access comes back in
    /// `regain_minutes`.
    RateLimited { code: u32, regain_minutes: u32 },
    /// HTTP 400, code 190, subcode 463: the token expired.
    TokenExpired,
    /// HTTP 500, code 2, `is_transient`.
    ServerError,
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct GraphCall {
    /// The Page the path names.
    pub page_id: String,
    /// The path, without the query.
    pub path: String,
    /// The bearer token (or `access_token` parameter), if any.
    pub token: Option<String>,
    /// The query string: a token must never be in it.
    pub query: String,
    /// When it arrived.
    pub at: Instant,
}

/// The running fake; it stops when dropped.
pub struct FakeGraph {
    /// Where it listens.
    addr: SocketAddr,
    /// Pages, scripted failures and calls, shared with the handler.
    state: Arc<Mutex<GraphState>>,
    /// The accept loop.
    server: JoinHandle<()>,
}

#[derive(Default)]
struct GraphState {
    /// Each known Page's metadata object, as answered.
    pages: HashMap<String, Value>,
    /// Failures still to answer, per Page, in order.
    failures: HashMap<String, VecDeque<Failure>>,
    /// A failure per Page answered after that many more of its requests were answered normally.
    later_failures: HashMap<String, (usize, Failure)>,
    /// Answers to hold back until released, per Page, in order.
    holds: HashMap<String, VecDeque<Arc<Notify>>>,
    /// Every request, in arrival order.
    calls: Vec<GraphCall>,
    /// Each Page's conversations, in the order they were created.
    conversations: HashMap<String, Vec<FakeConversation>>,
    /// Conversations per page of results (the client's `limit` when unset).
    conversations_per_page: Option<usize>,
    /// Messages per page of a conversation's messages (nested and alone).
    messages_per_page: usize,
    /// Facebook Login's people, codes and subscriptions.
    login: LoginState,
}

/// A conversation the fake serves.
#[derive(Debug, Clone)]
pub struct FakeConversation {
    /// `t_<page>_<n>`.
    pub id: String,
    /// The person on the other side.
    pub user_psid: String,
    /// Oldest first.
    pub messages: Vec<FakeMessage>,
}

/// A message of a fake conversation.
#[derive(Debug, Clone)]
pub struct FakeMessage {
    /// `m_<page>_<n>_<k>`: the webhook `mid` of the same message.
    pub id: String,
    /// Whole seconds, as Graph times are.
    pub created_ms: i64,
    /// Sent by the Page (an echo) rather than by the person.
    pub from_page: bool,
    pub text: String,
}

/// Only a conversation's most recent messages have details.
pub const MESSAGES_WITH_DETAILS: usize = 20;

/// The page access token the fake hands out for `page_id`; it must never be stored.
pub fn page_token(page_id: &str) -> String {
    format!("EAAG-page-token-{page_id}-must-never-be-stored")
}

/// A Page's full metadata object, as Graph answers it (token included).
fn page_object(page_id: &str, name: &str) -> Value {
    json!({
        "id": page_id,
        "name": name,
        "category": "Clothing Store",
        "about": "Handmade clothes, shipped daily.",
        "website": "https://shop.example.com",
        "link": format!("https://www.facebook.com/{page_id}"),
        "picture": {"data": {
            "height": 50,
            "is_silhouette": false,
            "url": format!("https://scontent.example.com/{page_id}/picture.jpg"),
            "width": 50
        }},
        "fan_count": 1234,
        "verification_status": "not_verified",
        "location": {
            "city": "Berlin",
            "country": "Germany",
            "latitude": 52.52,
            "longitude": 13.405,
            "street": "Beispielstraße 1",
            "zip": "10115"
        },
        "phone": "+49 30 1234567",
        "email": "shop@example.com",
        "created_time": CREATED_TIME,
        "access_token": page_token(page_id),
    })
}

impl FakeGraph {
    /// Starts the fake on 127.0.0.1:0 with no Pages.
    pub async fn start() -> Self {
        let state: Arc<Mutex<GraphState>> = Arc::new(Mutex::new(GraphState {
            messages_per_page: 25,
            ..GraphState::default()
        }));
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(state.clone());
        let (addr, server) = super::serve_on_loopback(app).await;
        Self {
            addr,
            state,
            server,
        }
    }

    /// The base URL for FACEBOOK_GRAPH_URL: `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates the Page, or renames it (its other fields stay).
    pub fn set_page(&self, page_id: &str, name: &str) {
        let mut state = self.state();
        match state.pages.get_mut(page_id) {
            Some(page) => page["name"] = json!(name),
            None => {
                state
                    .pages
                    .insert(page_id.into(), page_object(page_id, name));
            }
        }
    }

    /// Sets one field of a Page already set (e.g. `fan_count`).
    pub fn set_page_field(&self, page_id: &str, field: &str, value: Value) {
        let mut state = self.state();
        let page = state
            .pages
            .get_mut(page_id)
            .unwrap_or_else(|| panic!("page {page_id} was never set"));
        page[field] = value;
    }

    /// The Page's metadata object as the fake answers it, token included.
    pub fn page(&self, page_id: &str) -> Option<Value> {
        self.state().pages.get(page_id).cloned()
    }

    /// Queues a failure for the Page's next request (any endpoint).
    pub fn push_failure(&self, page_id: &str, failure: Failure) {
        let mut state = self.state();
        state
            .failures
            .entry(page_id.into())
            .or_default()
            .push_back(failure);
    }

    /// Answers the Page's request after the next `skip` ones (any endpoint) with `failure`.
    pub fn fail_after(&self, page_id: &str, skip: usize, failure: Failure) {
        self.state()
            .later_failures
            .insert(page_id.into(), (skip, failure));
    }

    /// Failures queued for the Page and not answered yet.
    pub fn pending_failures(&self, page_id: &str) -> usize {
        self.state().failures.get(page_id).map_or(0, VecDeque::len)
    }

    /// Holds the Page's next request (any endpoint): it is answered as the fake would answer it
    /// on arrival (the Page as it is then, or the next scripted failure), but only once the
    /// returned hold is released. Several holds apply to the next requests in order.
    pub fn hold_next(&self, page_id: &str) -> GraphHold {
        let release = Arc::new(Notify::new());
        let mut state = self.state();
        state
            .holds
            .entry(page_id.into())
            .or_default()
            .push_back(release.clone());
        GraphHold(release)
    }

    /// Every request so far, in arrival order.
    pub fn calls(&self) -> Vec<GraphCall> {
        self.state().calls.clone()
    }

    /// When each request for the Page arrived, in order.
    /// How many calls so far read a Page's history (its conversations or their messages).
    pub fn history_reads(&self, page_id: &str) -> usize {
        self.state()
            .calls
            .iter()
            .filter(|c| c.page_id == page_id)
            .filter(|c| c.path.ends_with("/conversations") || c.path.ends_with("/messages"))
            .count()
    }

    pub fn calls_for(&self, page_id: &str) -> Vec<Instant> {
        let state = self.state();
        let calls = state.calls.iter().filter(|c| c.page_id == page_id);
        calls.map(|c| c.at).collect()
    }

    /// Sets the page sizes of conversations (overriding the client's `limit`) and messages.
    pub fn set_paging(&self, conversations_per_page: usize, messages_per_page: usize) {
        let mut state = self.state();
        state.conversations_per_page = Some(conversations_per_page);
        state.messages_per_page = messages_per_page;
    }

    /// Adds a conversation of `page_id` with `user_psid`: `count` messages a second apart from
    /// `start_ms` (whole seconds), the person and the Page taking turns. Returns its messages.
    pub fn add_conversation(
        &self,
        page_id: &str,
        user_psid: &str,
        count: usize,
        start_ms: i64,
    ) -> Vec<FakeMessage> {
        let mut state = self.state();
        let conversations = state.conversations.entry(page_id.into()).or_default();
        let n = conversations.len();
        let messages: Vec<FakeMessage> = (0..count)
            .map(|k| FakeMessage {
                id: format!("m_{page_id}_{n}_{k}"),
                created_ms: start_ms / 1000 * 1000 + k as i64 * 1000,
                from_page: k % 2 == 1,
                text: format!("message {k} with {user_psid}"),
            })
            .collect();
        conversations.push(FakeConversation {
            id: format!("t_{page_id}_{n}"),
            user_psid: user_psid.into(),
            messages: messages.clone(),
        });
        messages
    }

    /// Adds a message from the person to their conversation (created at `created_ms`, whole
    /// seconds), which moves the conversation to the top. Returns it.
    pub fn add_message(&self, page_id: &str, user_psid: &str, created_ms: i64) -> FakeMessage {
        let mut state = self.state();
        let conversation = state
            .conversations
            .get_mut(page_id)
            .and_then(|all| all.iter_mut().find(|c| c.user_psid == user_psid))
            .unwrap_or_else(|| panic!("no conversation with {user_psid} on {page_id}"));
        let k = conversation.messages.len();
        let message = FakeMessage {
            id: format!("{}_{k}", conversation.id.replacen("t_", "m_", 1)),
            created_ms: created_ms / 1000 * 1000,
            from_page: false,
            text: format!("message {k} with {user_psid}"),
        };
        conversation.messages.push(message.clone());
        message
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GraphState> {
        self.state.lock().expect("fake graph lock")
    }
}

/// A request held back by [`FakeGraph::hold_next`].
pub struct GraphHold(Arc<Notify>);

impl GraphHold {
    /// Sends the held answer (at once if the request has not arrived yet).
    pub fn release(&self) {
        self.0.notify_one();
    }
}

impl Drop for FakeGraph {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A Graph error answer.
fn graph_error(status: StatusCode, error: Value) -> Response {
    (status, Json(json!({ "error": error }))).into_response()
}

fn failure_answer(page_id: &str, failure: &Failure) -> Response {
    match failure {
        Failure::RateLimited {
            code,
            regain_minutes,
        } => {
            let message = match code {
                4 => "(#4) Application request limit reached".to_string(),
                17 => "(#17) User request limit reached".to_string(),
                32 => "(#32) Page request limit reached".to_string(),
                613 => "(#613) Calls to this api have exceeded the rate limit.".to_string(),
                80006 => "(#80006) There have been too many messenger api calls to this Page \
                          account. Wait a while and try again."
                    .to_string(),
                other => format!("(#{other}) Rate limit reached"),
            };
            let status = if matches!(code, 4 | 17) {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::BAD_REQUEST
            };
            let usage = json!({ page_id: [{
                "type": "pages",
                "call_count": 100,
                "total_cputime": 10,
                "total_time": 10,
                "estimated_time_to_regain_access": regain_minutes,
            }]});
            let error = json!({
                "message": message,
                "type": "OAuthException",
                "code": code,
                "fbtrace_id": "x",
            });
            let mut response = graph_error(status, error);
            let usage = usage
                .to_string()
                .parse()
                .expect("JSON is a valid header value");
            response
                .headers_mut()
                .insert("x-business-use-case-usage", usage);
            response
        }
        Failure::TokenExpired => graph_error(
            StatusCode::BAD_REQUEST,
            json!({
                "message": "Error validating access token: Session has expired on Tuesday, \
                            12-Jul-22 12:00:00 PDT. The current time is Wednesday, \
                            13-Jul-22 09:00:00 PDT.",
                "type": "OAuthException",
                "code": 190,
                "error_subcode": 463,
                "fbtrace_id": "x",
            }),
        ),
        Failure::ServerError => graph_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({
                "message": "An unexpected error has occurred. Please retry your request later.",
                "type": "OAuthException",
                "is_transient": true,
                "code": 2,
                "fbtrace_id": "x",
            }),
        ),
    }
}

/// The token from `Authorization: Bearer`, else from the `access_token` parameter.
fn token_of(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let parameter = || {
        query?
            .split('&')
            .find_map(|pair| pair.strip_prefix("access_token="))
    };
    bearer.or_else(parameter).map(String::from)
}

/// The path's segments without a version prefix: `[page_id, ...]`.
fn segments_of(path: &str) -> Vec<&str> {
    let mut segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let versioned = segments.first().is_some_and(|first| {
        first.len() > 1
            && first.starts_with('v')
            && first[1..].chars().all(|c| c.is_ascii_digit() || c == '.')
    });
    if versioned {
        segments.remove(0);
    }
    segments
}

/// Answers a request, after its hold (if any) is released.
async fn answer(State(state): State<Arc<Mutex<GraphState>>>, request: Request) -> Response {
    if is_login_route(request.uri().path()) {
        return login_answer(&state, request).await;
    }
    let (response, hold) = {
        let mut state = state.lock().expect("fake graph lock");
        let page_id = segments_of(request.uri().path())
            .first()
            .copied()
            .unwrap_or_default()
            .to_string();
        let hold = state.holds.get_mut(&page_id).and_then(VecDeque::pop_front);
        (answer_now(&mut state, request), hold)
    };
    if let Some(hold) = hold {
        hold.notified().await;
    }
    response
}

/// The answer to a request as it arrives, recorded in `state.calls`.
fn answer_now(state: &mut GraphState, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    let token = token_of(request.headers(), request.uri().query());
    let segments = segments_of(&path);
    let page_id = owner_page(segments.first().copied().unwrap_or_default()).to_string();

    state.calls.push(GraphCall {
        page_id: page_id.clone(),
        path: path.clone(),
        token: token.clone(),
        query: query.clone(),
        at: Instant::now(),
    });
    if token.is_none() {
        return graph_error(
            StatusCode::BAD_REQUEST,
            json!({
                "message": "An access token is required to request this resource.",
                "type": "OAuthException",
                "code": 104,
                "fbtrace_id": "x",
            }),
        );
    }
    if let Some(failure) = state
        .failures
        .get_mut(&page_id)
        .and_then(VecDeque::pop_front)
    {
        return failure_answer(&page_id, &failure);
    }
    if let Some((skip, _)) = state.later_failures.get_mut(&page_id) {
        if *skip == 0 {
            let (_, failure) = state.later_failures.remove(&page_id).expect("present");
            return failure_answer(&page_id, &failure);
        }
        *skip -= 1;
    }
    let unsupported = || {
        graph_error(
            StatusCode::BAD_REQUEST,
            json!({
                "message": format!(
                    "Unsupported {} request. Object with ID '{page_id}' does not exist, cannot be \
                     loaded due to missing permissions, or does not support this operation. \
                     Please read the Graph API documentation at \
                     https://developers.facebook.com/docs/graph-api",
                    request.method().as_str().to_lowercase()
                ),
                "type": "GraphMethodException",
                "code": 100,
                "error_subcode": 33,
                "fbtrace_id": "x",
            }),
        )
    };
    let Some(page) = state.pages.get(&page_id) else {
        return unsupported();
    };
    if request.method() != axum::http::Method::GET {
        return unsupported();
    }
    let page = page.clone();
    let base = format!(
        "http://{}/v25.0",
        request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1")
    );
    let token = token.unwrap_or_default();
    let parameters = parameters_of(&query);
    match segments.as_slice() {
        [id] if id.starts_with("m_") => message_answer(state, &page_id, id),
        [_] => Json(page).into_response(),
        [_, "conversations"] => conversations_answer(state, &page_id, &parameters, &base, &token),
        [conversation, "messages"] => {
            let Some(found) = state
                .conversations
                .get(&page_id)
                .and_then(|all| all.iter().find(|c| c.id == *conversation))
                .cloned()
            else {
                return unsupported();
            };
            let after = parameters
                .get("after")
                .and_then(|a| a.parse().ok())
                .unwrap_or(0);
            let messages = messages_page(state, &page_id, &found, after, &base, &token);
            Json(messages).into_response()
        }
        _ => unsupported(),
    }
}

/// The Page a path's first segment belongs to: a Page id, or a conversation (`t_<page>_<n>`)
/// or message (`m_<page>_<n>_<k>`) id of the fake's.
fn owner_page(segment: &str) -> &str {
    if segment.starts_with("t_") || segment.starts_with("m_") {
        segment.split('_').nth(1).unwrap_or(segment)
    } else {
        segment
    }
}

/// A query string's parameters.
fn parameters_of(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A message as the Graph API lists it: with its details when it is among the conversation's
/// most recent, else only `id` and `created_time`.
fn message_json(page_id: &str, conversation: &FakeConversation, index: usize) -> Value {
    let message = &conversation.messages[index];
    let created = graph_time(message.created_ms);
    if conversation.messages.len() - index > MESSAGES_WITH_DETAILS {
        return json!({"id": message.id, "created_time": created});
    }
    let (from, to) = if message.from_page {
        (page_id, conversation.user_psid.as_str())
    } else {
        (conversation.user_psid.as_str(), page_id)
    };
    let party = |id: &str| json!({"id": id, "name": format!("Name of {id}"), "email": format!("{id}@facebook.com")});
    json!({
        "id": message.id,
        "created_time": created,
        "from": party(from),
        "to": {"data": [party(to)]},
        "message": message.text,
    })
}

/// Graph's time format for whole-second milliseconds.
fn graph_time(ms: i64) -> String {
    let seconds = ms / 1000;
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}+0000",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// A page of a conversation's messages, newest first, from offset `after`.
fn messages_page(
    state: &GraphState,
    page_id: &str,
    conversation: &FakeConversation,
    after: usize,
    base: &str,
    token: &str,
) -> Value {
    let newest_first: Vec<usize> = (0..conversation.messages.len()).rev().collect();
    let size = state.messages_per_page;
    let data: Vec<Value> = newest_first
        .iter()
        .skip(after)
        .take(size)
        .map(|&index| message_json(page_id, conversation, index))
        .collect();
    let mut page = json!({"data": data, "paging": {"cursors": {"before": after.to_string(), "after": (after + size).to_string()}}});
    if after + size < newest_first.len() {
        page["paging"]["next"] = json!(format!(
            "{base}/{}/messages?access_token={token}&fields=id%2Ccreated_time%2Cfrom%2Cto%2Cmessage%2Cattachments&limit={size}&after={}",
            conversation.id,
            after + size
        ));
    }
    page
}

/// A page of the Page's conversations, newest update first.
fn conversations_answer(
    state: &GraphState,
    page_id: &str,
    parameters: &HashMap<String, String>,
    base: &str,
    token: &str,
) -> Response {
    let mut conversations = state
        .conversations
        .get(page_id)
        .cloned()
        .unwrap_or_default();
    let updated = |c: &FakeConversation| c.messages.last().map_or(0, |m| m.created_ms);
    conversations.sort_by_key(|c| std::cmp::Reverse(updated(c)));
    let size = state.conversations_per_page.unwrap_or_else(|| {
        parameters
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(25)
    });
    let after: usize = parameters
        .get("after")
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let data: Vec<Value> = conversations
        .iter()
        .skip(after)
        .take(size)
        .map(|c| {
            json!({
                "id": c.id,
                "updated_time": graph_time(updated(c)),
                "messages": messages_page(state, page_id, c, 0, base, token),
            })
        })
        .collect();
    let mut page = json!({"data": data, "paging": {"cursors": {"before": after.to_string(), "after": (after + size).to_string()}}});
    if after + size < conversations.len() {
        page["paging"]["next"] = json!(format!(
            "{base}/{page_id}/conversations?access_token={token}&platform=messenger&fields=id%2Cupdated_time%2Cmessages&limit={size}&after={}",
            after + size
        ));
    }
    Json(page).into_response()
}

/// One message's details, or error 100 for a message older than the 20 most recent.
fn message_answer(state: &GraphState, page_id: &str, message_id: &str) -> Response {
    let found = state.conversations.get(page_id).and_then(|all| {
        all.iter().find_map(|c| {
            c.messages
                .iter()
                .position(|m| m.id == message_id)
                .map(|index| (c, index))
        })
    });
    match found {
        Some((conversation, index))
            if conversation.messages.len() - index <= MESSAGES_WITH_DETAILS =>
        {
            Json(message_json(page_id, conversation, index)).into_response()
        }
        _ => graph_error(
            StatusCode::BAD_REQUEST,
            json!({
                "message": "(#100) Only the 20 most recent messages of a conversation can be read",
                "type": "OAuthException",
                "code": 100,
                "fbtrace_id": "x",
            }),
        ),
    }
}

// --- Facebook Login ----------------------------------------------------------------------------

/// The fake app's credentials: the exchanges refuse any other.
pub const LOGIN_APP_ID: &str = "123456789012345";
pub const LOGIN_APP_SECRET: &str = super::webhook::APP_SECRET;

/// A person who can log in, and what their login answers.
#[derive(Debug, Clone, Default)]
struct FakePerson {
    /// Their Pages, in `/me/accounts` order.
    pages: Vec<String>,
    /// Permissions they declined.
    declined: Vec<String>,
}

#[derive(Default)]
struct LoginState {
    /// People by their app-scoped id.
    people: HashMap<String, FakePerson>,
    /// Login codes handed out by the dialog, by code: whose they are.
    codes: HashMap<String, String>,
    /// Each Page's subscribed fields (the fake's one app).
    subscriptions: HashMap<String, Vec<String>>,
    /// `/me/accounts` entries per page of results (2 unless set).
    accounts_page_size: Option<usize>,
    /// Every Login request: method, path and query (the query as sent).
    requests: Vec<(String, String, String)>,
}

/// The short-lived user token of the fake's code exchange.
pub fn short_user_token(person: &str) -> String {
    format!("EAAB-short-user-token-{person}-must-never-be-stored")
}

/// The long-lived user token of the fake's `fb_exchange_token`.
pub fn long_user_token(person: &str) -> String {
    format!("EAAB-long-user-token-{person}-must-never-be-stored")
}

impl FakeGraph {
    /// Creates (or replaces) a person whose `/me/accounts` lists `pages` (each set as a Page
    /// named after its id when new).
    pub fn set_person(&self, person: &str, pages: &[&str]) {
        for page in pages {
            if self.page(page).is_none() {
                self.set_page(page, &format!("Page {page}"));
            }
        }
        let mut state = self.state();
        let entry = state.login.people.entry(person.into()).or_default();
        entry.pages = pages.iter().map(|p| p.to_string()).collect();
    }

    /// The person declines `permission` at their next logins.
    pub fn decline(&self, person: &str, permission: &str) {
        let mut state = self.state();
        let entry = state.login.people.entry(person.into()).or_default();
        entry.declined.push(permission.into());
    }

    /// A fresh login code for `person` (what the dialog hands the callback).
    pub fn login_code(&self, person: &str) -> String {
        let code = format!("code-{person}-{}", uuid::Uuid::new_v4().simple());
        self.state().login.codes.insert(code.clone(), person.into());
        code
    }

    /// `/me/accounts` entries per page of results.
    pub fn set_accounts_page_size(&self, size: usize) {
        self.state().login.accounts_page_size = Some(size.max(1));
    }

    /// The fields the app is subscribed to on a Page (empty when not subscribed).
    pub fn subscribed_fields(&self, page_id: &str) -> Vec<String> {
        self.state()
            .login
            .subscriptions
            .get(page_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Facebook unsubscribes the app from the Page (as after an hour of failed deliveries), or
    /// leaves it `fields` only.
    pub fn set_subscription(&self, page_id: &str, fields: &[&str]) {
        let fields = fields.iter().map(|f| f.to_string()).collect();
        self.state()
            .login
            .subscriptions
            .insert(page_id.to_string(), fields);
    }

    /// Every Login request so far: (method, path, query).
    pub fn login_requests(&self) -> Vec<(String, String, String)> {
        self.state().login.requests.clone()
    }
}

fn is_login_route(path: &str) -> bool {
    let segments = segments_of(path);
    matches!(
        segments.as_slice(),
        ["oauth", "access_token"] | ["me"] | ["me", ..] | [_, "subscribed_apps"]
    )
}

/// An OAuth error as Graph answers it.
fn oauth_error(message: &str, code: u32) -> Response {
    graph_error(
        StatusCode::BAD_REQUEST,
        json!({"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "x"}),
    )
}

/// `key=value&...` decoded.
fn form_pairs(text: &str) -> HashMap<String, String> {
    let Ok(url) = reqwest::Url::parse(&format!("http://form.invalid/?{text}")) else {
        return HashMap::new();
    };
    url.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

async fn login_answer(state: &Arc<Mutex<GraphState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&body).into_owned();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or_default().to_string();
    let token = token_of(&parts.headers, parts.uri.query());
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string();
    let segments: Vec<String> = segments_of(&path).iter().map(|s| s.to_string()).collect();
    let mut state = state.lock().expect("fake graph lock");
    state.calls.push(GraphCall {
        page_id: segments.first().cloned().unwrap_or_default(),
        path: path.clone(),
        token: token.clone(),
        query: query.clone(),
        at: Instant::now(),
    });
    state
        .login
        .requests
        .push((parts.method.to_string(), path.clone(), query.clone()));
    let post = parts.method == axum::http::Method::POST;
    let login = &mut state.login;
    let person_of = |login: &LoginState, token: &Option<String>| -> Option<String> {
        let token = token.as_deref()?;
        login
            .people
            .keys()
            .find(|person| long_user_token(person) == token)
            .cloned()
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match segments.as_slice() {
        ["oauth", "access_token"] => {
            if parts.method != axum::http::Method::GET {
                return oauth_error("Unsupported request: the exchange is a GET", 100);
            }
            let form = form_pairs(&query);
            if form.get("client_id").map(String::as_str) != Some(LOGIN_APP_ID)
                || form.get("client_secret").map(String::as_str) != Some(LOGIN_APP_SECRET)
            {
                return oauth_error("Error validating client secret.", 1);
            }
            if form.get("grant_type").map(String::as_str) == Some("fb_exchange_token") {
                let short = form.get("fb_exchange_token").cloned().unwrap_or_default();
                let person = login
                    .people
                    .keys()
                    .find(|person| short_user_token(person) == short)
                    .cloned();
                return match person {
                    Some(person) => Json(json!({
                        "access_token": long_user_token(&person),
                        "token_type": "bearer",
                        "expires_in": 5183944,
                    }))
                    .into_response(),
                    None => oauth_error("Invalid OAuth access token.", 190),
                };
            }
            let code = form.get("code").cloned().unwrap_or_default();
            match login.codes.get(&code) {
                Some(person) => Json(json!({
                    "access_token": short_user_token(person),
                    "token_type": "bearer",
                    "expires_in": 5183944,
                }))
                .into_response(),
                None => oauth_error("Invalid verification code format.", 100),
            }
        }
        ["me"] => match person_of(login, &token) {
            Some(person) => Json(json!({"id": person})).into_response(),
            None => oauth_error("Invalid OAuth access token.", 190),
        },
        ["me", "permissions"] => match person_of(login, &token) {
            Some(person) => {
                let declined = login.people[&person].declined.clone();
                let data: Vec<Value> = [
                    "pages_messaging",
                    "pages_show_list",
                    "pages_manage_metadata",
                    "pages_read_engagement",
                    "public_profile",
                ]
                .iter()
                .map(|permission| {
                    let status = if declined.iter().any(|d| d == permission) {
                        "declined"
                    } else {
                        "granted"
                    };
                    json!({"permission": permission, "status": status})
                })
                .collect();
                Json(json!({"data": data})).into_response()
            }
            None => oauth_error("Invalid OAuth access token.", 190),
        },
        ["me", "accounts"] => {
            let Some(person) = person_of(login, &token) else {
                return oauth_error("Invalid OAuth access token.", 190);
            };
            let size = login.accounts_page_size.unwrap_or(2);
            let after: usize = form_pairs(&query)
                .get("after")
                .and_then(|a| a.parse().ok())
                .unwrap_or(0);
            let pages = login.people[&person].pages.clone();
            let data: Vec<Value> = pages
                .iter()
                .skip(after)
                .take(size)
                .map(|page| {
                    let name = state
                        .pages
                        .get(page)
                        .and_then(|p| p["name"].as_str())
                        .unwrap_or("Page")
                        .to_string();
                    json!({
                        "access_token": page_token(page),
                        "category": "Shopping & Retail",
                        "category_list": [{"id": "200600219953504", "name": "Shopping & Retail"}],
                        "name": name,
                        "id": page,
                        "tasks": ["ADVERTISE", "ANALYZE", "CREATE_CONTENT", "MESSAGING", "MODERATE", "MANAGE"],
                    })
                })
                .collect();
            let mut paging = json!({"cursors": {"before": after.to_string(), "after": (after + size).to_string()}});
            if after + size < pages.len() {
                // As Graph writes it: the token in the link.
                paging["next"] = json!(format!(
                    "http://{host}/v25.0/me/accounts?access_token={}&fields=id%2Cname%2Caccess_token&limit={size}&after={}",
                    token.unwrap_or_default(),
                    after + size
                ));
            }
            Json(json!({"data": data, "paging": paging})).into_response()
        }
        [page_id, "subscribed_apps"] => {
            if let Some(failure) = state
                .failures
                .get_mut(*page_id)
                .and_then(VecDeque::pop_front)
            {
                return failure_answer(page_id, &failure);
            }
            let login = &mut state.login;
            if token.as_deref() != Some(page_token(page_id).as_str()) {
                return oauth_error("Invalid OAuth access token.", 190);
            }
            if post {
                let fields = form_pairs(&body)
                    .get("subscribed_fields")
                    .map(|f| f.split(',').map(String::from).collect())
                    .unwrap_or_default();
                login.subscriptions.insert(page_id.to_string(), fields);
                return Json(json!({"success": true})).into_response();
            }
            let data: Vec<Value> = login
                .subscriptions
                .get(*page_id)
                .map(|fields| {
                    vec![json!({
                        "category": "Business",
                        "link": "https://www.example.com/",
                        "name": "Sales Bot",
                        "id": LOGIN_APP_ID,
                        "subscribed_fields": fields,
                    })]
                })
                .unwrap_or_default();
            Json(json!({"data": data})).into_response()
        }
        _ => oauth_error("Unknown path components", 2500),
    }
}
