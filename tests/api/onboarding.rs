//! Shop owners connect their Pages, end to end through the real binary (`fbsync up`) and local
//! fakes of Shopify, Facebook's Login dialog and the Graph API: Shopify install to session
//! cookie; Facebook Login to tokens stored sealed, the app subscribed, `page_data.json`
//! written and the history backfilled by the onboarding job; owners kept apart; a Page moving between owners; `/me/accounts`
//! over several pages of results; tampered, expired and replayed states; a bad Shopify HMAC; a
//! shop outside `*.myshopify.com`; a cancelled login and a declined permission; Meta's signed
//! deauthorize and data-deletion callbacks. Every test ends by searching its HTTP answers, its
//! log lines, its bucket objects (and its SQLite file) for every fake token: none may appear.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::common::fake_dialog::{DialogAnswer, FakeDialog};
use crate::common::fake_graph::{
    Failure, FakeGraph, LOGIN_APP_ID, LOGIN_APP_SECRET, long_user_token, page_token,
    short_user_token,
};
use crate::common::fake_shopify::{
    FakeShopify, SHOPIFY_API_KEY, SHOPIFY_API_SECRET, shop_token, shopify_hmac,
};
use crate::common::pipeline::{DbKind, Pipeline, StoreKind};
use crate::common::process::FbsyncProcess;
use crate::common::spaces_limits::{
    SpacesLimitLayer, SpacesLimits, list_keys, read_object, s3_endpoint,
};
use crate::common::webhook::{message_delivery, post_signed, webhook_client};

/// Signs the OAuth states of the tests' pipelines.
pub const STATE_SECRET: &str = "test-state-token-secret-0123456789";

/// The cookie that binds a sign-in to its browser (plain http: no `__Host-` prefix).
pub(crate) const SIGN_IN_COOKIE: &str = "fbsync_signin";

/// How long onboarding may take.
pub(crate) const ONBOARDING_LIMIT: Duration = Duration::from_secs(60);

/// The backfill step's outcome once its poll job is queued.
const BACKFILL_STARTED: &str = "started: a backfill poll is queued";

/// The backfill step's outcome for a Page whose history was read before (a reconnect).
pub(crate) const HISTORY_KEPT: &str = "done earlier: a poll of what is new since is queued";

/// One HTTP answer, kept for the token search.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    /// The Location header.
    pub fn location(&self) -> String {
        self.headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no Location in {} {}", self.status, self.body))
            .to_string()
    }

    /// The Set-Cookie header that sets (or clears) the session cookie.
    pub fn set_cookie(&self) -> Option<String> {
        self.set_cookies()
            .into_iter()
            .find(|cookie| cookie.starts_with("session_id="))
    }

    /// Every Set-Cookie header.
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(String::from)
            .collect()
    }
}

/// A pipeline with the owner routes on, the three fakes, and a record of every answer.
pub struct OwnerEnv {
    pub pipeline: Pipeline,
    pub graph: FakeGraph,
    pub shopify: FakeShopify,
    pub dialog: FakeDialog,
    pub process: FbsyncProcess,
    /// `http://127.0.0.1:PORT` of ingest.
    pub base: String,
    client: reqwest::Client,
    /// Every answer of every request, for the token search.
    answers: Arc<Mutex<Vec<String>>>,
    /// Every log line read so far.
    log_lines: Vec<String>,
}

/// A free port on 127.0.0.1 (the redirect URIs must name ingest's port before it starts).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

impl OwnerEnv {
    pub async fn start(db: DbKind, store: StoreKind) -> Self {
        Self::start_with(db, store, &[]).await
    }

    /// As [`OwnerEnv::start`], with more settings (`AMQP_URL` through a proxy, say).
    pub async fn start_with(db: DbKind, store: StoreKind, settings: &[(&str, String)]) -> Self {
        let mut pipeline = Pipeline::new(db, store).await;
        for (key, value) in settings {
            pipeline.set(key, value);
        }
        let graph = FakeGraph::start().await;
        let shopify = FakeShopify::start().await;
        let dialog = FakeDialog::start().await;
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        for (key, value) in [
            ("INGEST_ADDR", format!("127.0.0.1:{port}")),
            ("FACEBOOK_GRAPH_URL", graph.url()),
            ("FACEBOOK_APP_ID", LOGIN_APP_ID.to_string()),
            ("FACEBOOK_REDIRECT_URI", format!("{base}/facebook/callback")),
            ("FACEBOOK_DIALOG_URL", dialog.url()),
            ("SHOPIFY_API_KEY", SHOPIFY_API_KEY.to_string()),
            ("SHOPIFY_API_SECRET", SHOPIFY_API_SECRET.to_string()),
            ("SHOPIFY_REDIRECT_URI", format!("{base}/shopify/callback")),
            ("SHOPIFY_ADMIN_URL", shopify.admin_url()),
            ("STATE_TOKEN_SECRET", STATE_SECRET.to_string()),
        ] {
            pipeline.set(key, &value);
        }
        let (process, urls) = pipeline.up().await;
        assert_eq!(
            urls.public, base,
            "ingest listens where the redirect URIs say"
        );
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        Self {
            pipeline,
            graph,
            shopify,
            dialog,
            process,
            base,
            client,
            answers: Arc::default(),
            log_lines: Vec::new(),
        }
    }

    /// An owner's browser: its own cookie.
    pub fn owner(&self) -> Owner {
        Owner {
            client: self.client.clone(),
            base: self.base.clone(),
            cookies: BTreeMap::new(),
            answers: self.answers.clone(),
        }
    }

    /// Keeps an answer read some other way (a browser's page) for the token search.
    pub fn record(&self, answer: String) {
        self.answers.lock().expect("lock").push(answer);
    }

    /// `fbsync pages list --json`, one value per Page.
    pub async fn pages_list(&self) -> Vec<Value> {
        let (code, stdout, stderr) = self.pipeline.run(&["pages", "list", "--json"]).await;
        assert_eq!(code, 0, "pages list: {stderr}");
        self.answers.lock().expect("lock").push(stdout.clone());
        stdout
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Every object in the store: key and bytes.
    pub async fn objects(&self) -> Vec<(String, Vec<u8>)> {
        let mut objects = Vec::new();
        match &self.pipeline.bucket {
            Some(bucket) => {
                for key in list_keys(&s3_endpoint(), bucket, "").await {
                    let bytes = read_object(&s3_endpoint(), bucket, &key)
                        .await
                        .unwrap_or_default();
                    objects.push((key, bytes));
                }
            }
            None => {
                let mut pending = vec![self.pipeline.data_dir.join("users")];
                while let Some(dir) = pending.pop() {
                    let Ok(entries) = std::fs::read_dir(&dir) else {
                        continue;
                    };
                    for entry in entries.flatten() {
                        let path = entry.path();
                        if path.is_dir() {
                            pending.push(path);
                        } else {
                            let key = path
                                .strip_prefix(&self.pipeline.data_dir)
                                .expect("under the data dir")
                                .display()
                                .to_string();
                            objects.push((key, std::fs::read(&path).unwrap_or_default()));
                        }
                    }
                }
            }
        }
        objects.sort();
        objects
    }

    /// Every object key under `users/<uuid>/`.
    pub async fn keys_of(&self, user_uuid: &str) -> Vec<String> {
        let prefix = format!("users/{user_uuid}/");
        self.objects()
            .await
            .into_iter()
            .map(|(key, _)| key)
            .filter(|key| key.starts_with(&prefix))
            .collect()
    }

    /// Searches every answer, log line, stored object and (SQLite) database file for each
    /// fake token of `people`, `pages` and `shops`; stops the process (clean exit asserted)
    /// and cleans up.
    pub async fn finish(mut self, people: &[&str], pages: &[&str], shops: &[&str]) {
        self.process.stop().await;
        self.log_lines.extend(self.process.take_lines());
        let mut tokens: Vec<String> = Vec::new();
        for person in people {
            tokens.push(short_user_token(person));
            tokens.push(long_user_token(person));
        }
        tokens.extend(pages.iter().map(|page| page_token(page)));
        tokens.extend(shops.iter().map(|shop| shop_token(shop)));
        tokens.push(SHOPIFY_API_SECRET.to_string());
        tokens.push(STATE_SECRET.to_string());
        tokens.push(LOGIN_APP_SECRET.to_string());
        let answers = self.answers.lock().expect("lock").clone();
        assert!(!answers.is_empty() && !self.log_lines.is_empty());
        let objects = self.objects().await;
        let mut database_files = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.pipeline.data_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("fbsync.db") {
                    database_files.push((name, std::fs::read(entry.path()).unwrap_or_default()));
                }
            }
        }
        for token in &tokens {
            for answer in &answers {
                assert!(
                    !answer.contains(token.as_str()),
                    "an HTTP answer shows {token}: {answer}"
                );
            }
            for line in &self.log_lines {
                assert!(
                    !line.contains(token.as_str()),
                    "a log line shows {token}: {line}"
                );
            }
            for (key, bytes) in objects.iter().chain(&database_files) {
                let text = String::from_utf8_lossy(bytes);
                assert!(!text.contains(token.as_str()), "{key} holds {token}");
            }
        }
        self.pipeline.cleanup().await;
    }
}

/// An owner's browser: a cookie, and every answer recorded.
pub struct Owner {
    client: reqwest::Client,
    base: String,
    /// The browser's cookies, by name.
    pub cookies: BTreeMap<String, String>,
    answers: Arc<Mutex<Vec<String>>>,
}

impl Owner {
    /// GETs `url` (absolute, or a path of ingest) with the cookie; keeps a Set-Cookie.
    pub async fn get(&mut self, url: &str) -> Answer {
        self.send(self.client.get(self.absolute(url))).await
    }

    /// GETs with `Accept: application/json`.
    pub async fn get_json(&mut self, url: &str) -> (StatusCode, Value) {
        let answer = self
            .send(
                self.client
                    .get(self.absolute(url))
                    .header("accept", "application/json"),
            )
            .await;
        let value = serde_json::from_str(&answer.body).unwrap_or(Value::Null);
        (answer.status, value)
    }

    /// POSTs a form.
    pub async fn post_form(&mut self, url: &str, form: &[(&str, &str)]) -> Answer {
        self.send(self.client.post(self.absolute(url)).form(form))
            .await
    }

    fn absolute(&self, url: &str) -> String {
        if url.starts_with("http") {
            url.to_string()
        } else {
            format!("{}{url}", self.base)
        }
    }

    async fn send(&mut self, mut request: reqwest::RequestBuilder) -> Answer {
        if !self.cookies.is_empty() {
            let header: Vec<String> = self
                .cookies
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect();
            request = request.header("cookie", header.join("; "));
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.text().await.unwrap_or_default();
        let answer = Answer {
            status,
            headers,
            body,
        };
        self.answers
            .lock()
            .expect("lock")
            .push(format!("{status} {:?}\n{}", answer.headers, answer.body));
        for set in answer.set_cookies() {
            let pair = set.split(';').next().unwrap_or_default();
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if value.is_empty() {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_string(), value.to_string());
            }
        }
        answer
    }

    /// Installs the app on `shop` through the fake Shopify: the callback's answer.
    pub async fn install_shop(&mut self, shop: &str) -> Answer {
        let login = self.get(&format!("/shopify/login?shop={shop}")).await;
        assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.body);
        let authorize = self.get(&login.location()).await;
        assert_eq!(authorize.status, StatusCode::FOUND, "{}", authorize.body);
        self.get(&authorize.location()).await
    }

    /// Logs `person` in through the fake dialog (approving): the callback's answer.
    pub async fn connect_facebook(&mut self, env: &OwnerEnv, person: &str) -> Answer {
        env.dialog
            .answer(DialogAnswer::Approve(env.graph.login_code(person)));
        self.facebook_round_trip().await
    }

    /// `/facebook/login`, the dialog, and the callback it sends back to.
    pub async fn facebook_round_trip(&mut self) -> Answer {
        let login = self.get("/facebook/login").await;
        assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.body);
        let dialog = self.get(&login.location()).await;
        assert_eq!(dialog.status, StatusCode::FOUND, "{}", dialog.body);
        self.get(&dialog.location()).await
    }

    /// `/connect` as JSON (200 asserted).
    pub async fn status(&mut self) -> Value {
        let (status, value) = self.get_json("/connect").await;
        assert_eq!(status, StatusCode::OK, "{value}");
        value
    }

    /// Waits until every one of `pages` has finished onboarding on `/connect`; returns it.
    pub async fn wait_onboarded(&mut self, pages: &[&str]) -> Value {
        let deadline = Instant::now() + ONBOARDING_LIMIT;
        loop {
            let status = self.status().await;
            let done = pages.iter().all(|page| {
                status["pages"].as_array().into_iter().flatten().any(|p| {
                    let backfill = &p["onboarding"]["backfill"];
                    p["page_id"] == *page
                        && (backfill == BACKFILL_STARTED || backfill == HISTORY_KEPT)
                })
            });
            if done {
                return status;
            }
            assert!(Instant::now() < deadline, "not onboarded: {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The user UUID of an owner, from `/connect`.
pub(crate) async fn user_of(owner: &mut Owner) -> String {
    owner.status().await["user_uuid"]
        .as_str()
        .expect("user_uuid")
        .to_string()
}

/// The Page ids `/connect` shows.
pub(crate) fn page_ids(status: &Value) -> Vec<String> {
    status["pages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["page_id"].as_str().map(String::from))
        .collect()
}

/// A `signed_request` as Facebook signs it, issued now.
pub(crate) fn signed_request(secret: &str, user_id: &str) -> String {
    signed_request_issued(secret, user_id, fbsync_shared::now_ms() / 1000)
}

/// A `signed_request` as Facebook signs it, issued at `issued_at` (seconds).
pub(crate) fn signed_request_issued(secret: &str, user_id: &str, issued_at: i64) -> String {
    let payload = URL_SAFE_NO_PAD.encode(
        json!({"algorithm": "HMAC-SHA256", "expires": 0, "issued_at": issued_at, "user_id": user_id})
            .to_string(),
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(payload.as_bytes());
    format!(
        "{}.{payload}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// A state as fbsync signs them, with any content (for expired and foreign states), bound to
/// `owner`'s browser.
pub(crate) fn forged_state(owner: &Owner, flow: &str, subject: &str, expires_at_ms: i64) -> String {
    let browser = owner
        .cookies
        .get(SIGN_IN_COOKIE)
        .map(|value| hex::encode(Sha256::digest(value.as_bytes())))
        .unwrap_or_default();
    let encoded = URL_SAFE_NO_PAD.encode(format!(
        "{flow}|{subject}|{browser}|{}|{expires_at_ms}",
        "ab".repeat(16)
    ));
    let mut mac = Hmac::<Sha256>::new_from_slice(STATE_SECRET.as_bytes()).expect("key");
    mac.update(encoded.as_bytes());
    format!("{encoded}.{}", hex::encode(mac.finalize().into_bytes()))
}

/// A Shopify callback URL with a correct HMAC over `params`.
pub(crate) fn shopify_callback(params: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let hmac = shopify_hmac(SHOPIFY_API_SECRET, &pairs);
    pairs.push(("hmac".into(), hmac));
    let mut url = reqwest::Url::parse("http://x.invalid/shopify/callback").expect("url");
    url.query_pairs_mut().extend_pairs(pairs);
    format!("/shopify/callback?{}", url.query().unwrap_or_default())
}

const PAGE_A: &str = "510249619162304";
const PAGE_B: &str = "610249619162305";

#[tokio::test]
async fn a_shop_owner_connects_a_page_end_to_end_token_sealed_app_subscribed_page_data_written_and_history_backfilled()
 {
    let env = OwnerEnv::start(DbKind::Postgres, StoreKind::S3 { endpoint: None }).await;
    env.graph.set_person("1001", &[PAGE_A]);
    // The Page's history, which the onboarding's backfill poll reads.
    let history = env
        .graph
        .add_conversation(PAGE_A, "psid-history", 3, 1_700_000_000_000);
    let mut owner = env.owner();

    let installed = owner.install_shop("handmade.myshopify.com").await;
    assert_eq!(installed.status, StatusCode::OK, "{}", installed.body);
    assert!(
        installed.body.contains("Connect Facebook Pages"),
        "{}",
        installed.body
    );
    assert!(installed.body.contains("/facebook/login"));
    let cookie = installed.set_cookie().expect("a session cookie");
    for attribute in ["session_id=", "HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    assert!(
        !cookie.contains("Secure"),
        "plain http redirect URIs: no Secure flag"
    );
    let authorize = &env.shopify.authorize_requests()[0];
    assert_eq!(authorize["client_id"], SHOPIFY_API_KEY);
    assert_eq!(authorize["scope"], "read_products");
    let user = user_of(&mut owner).await;

    let before = owner.cookies.clone();
    let callback = owner.connect_facebook(&env, "1001").await;
    assert_eq!(callback.status, StatusCode::SEE_OTHER, "{}", callback.body);
    assert_eq!(callback.location(), "/connect");
    assert_ne!(
        owner.cookies, before,
        "the login's session ends; a fresh one is issued"
    );
    let mut stale = env.owner();
    stale.cookies = before;
    assert_eq!(stale.get("/connect").await.status, StatusCode::UNAUTHORIZED);
    let dialog = &env.dialog.requests()[0];
    assert_eq!(dialog["client_id"], LOGIN_APP_ID);
    assert_eq!(
        dialog["scope"],
        "pages_messaging,pages_show_list,pages_manage_metadata,pages_read_engagement"
    );

    let status = owner.wait_onboarded(&[PAGE_A]).await;
    assert_eq!(status["shop"], "handmade.myshopify.com");
    let page = &status["pages"][0];
    assert_eq!(page["onboarding"]["subscribe"], "subscribed");
    assert_eq!(page["onboarding"]["page_data"], "written");
    assert_eq!(page["status"], "active");
    let fields = env.graph.subscribed_fields(PAGE_A);
    // Every Messenger field of the README's table, and the Page profile fields.
    for field in [
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
    ] {
        assert!(
            fields.iter().any(|f| f == field),
            "{field} not subscribed: {fields:?}"
        );
    }
    assert!(
        !fields.iter().any(|f| f == "response_feedback"),
        "response_feedback stays opt-in: {fields:?}"
    );
    // The backfill stores the Page's history; the objects written are that Page's metadata,
    // token dropped, and its real conversations: no test deliveries, no fake conversations.
    let conversation_key =
        format!("users/{user}/facebook_messenger/{PAGE_A}/conversations/psid-history.json");
    let deadline = Instant::now() + ONBOARDING_LIMIT;
    loop {
        let stored = env.pipeline.object(&conversation_key).await;
        let events: Vec<Value> = stored
            .map(|bytes| serde_json::from_slice(&bytes).expect("a JSON array"))
            .unwrap_or_default();
        if events.len() == history.len() {
            let mids: Vec<&str> = events
                .iter()
                .filter_map(|e| e["message"]["mid"].as_str())
                .collect();
            let expected: Vec<&str> = history.iter().map(|m| m.id.as_str()).collect();
            assert_eq!(mids, expected);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "history not backfilled: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page_data_key = format!("users/{user}/facebook_messenger/{PAGE_A}/page_data.json");
    let keys = env.keys_of(&user).await;
    assert_eq!(keys, vec![conversation_key.clone(), page_data_key.clone()]);
    let stored = env
        .pipeline
        .object(&page_data_key)
        .await
        .expect("page_data.json");
    let stored: Value = serde_json::from_slice(&stored).expect("json");
    let mut expected = env.graph.page(PAGE_A).expect("page");
    expected
        .as_object_mut()
        .expect("object")
        .remove("access_token");
    assert_eq!(stored, expected);
    // The exchanges were the GETs Meta documents, the app secret among their parameters (their
    // URLs are never logged: the secret search covers the logs); every other Graph call carried
    // its token in the header, none in a URL.
    let requests = env.graph.login_requests();
    let (exchanges, others): (Vec<_>, Vec<_>) = requests
        .iter()
        .partition(|(_, path, _)| path.ends_with("/oauth/access_token"));
    for (method, path, query) in &exchanges {
        assert_eq!(method, "GET", "{path}?{query}");
        assert!(query.contains("client_secret="), "{path}?{query}");
    }
    for wanted in ["code=", "grant_type=fb_exchange_token"] {
        assert!(
            exchanges.iter().any(|(_, _, query)| query.contains(wanted)),
            "no exchange with {wanted}: {exchanges:?}"
        );
    }
    for (method, path, query) in others {
        assert!(!query.contains("access_token="), "{method} {path}?{query}");
        assert!(!query.contains("client_secret="), "{method} {path}?{query}");
    }
    // `pages list` shows the onboarding steps.
    let listed = env.pages_list().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["user_uuid"], user.as_str());
    assert_eq!(listed[0]["onboarding"]["subscribe"], "subscribed");
    assert_eq!(listed[0]["onboarding"]["backfill"], BACKFILL_STARTED);
    let (code, table, stderr) = env.pipeline.run(&["pages", "list"]).await;
    assert_eq!(code, 0, "{stderr}");
    let steps = format!(
        "onboarding: subscribe: subscribed; page_data: written; backfill: {BACKFILL_STARTED}"
    );
    assert!(table.contains(&steps), "{table}");

    // Connecting again repeats nothing: already subscribed, metadata unchanged.
    owner.connect_facebook(&env, "1001").await;
    let deadline = Instant::now() + ONBOARDING_LIMIT;
    loop {
        let status = owner.status().await;
        let steps = &status["pages"][0]["onboarding"];
        // The earlier outcomes stay until the new job records its own.
        if steps["subscribe"] == "already subscribed"
            && steps["page_data"] == "unchanged (already current)"
            && (steps["backfill"] == BACKFILL_STARTED || steps["backfill"] == HISTORY_KEPT)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let html = owner.get("/connect").await;
    // In the owner's words: the Page by name, no step names.
    assert!(html.body.contains(PAGE_A), "{}", html.body);
    assert!(html.body.contains("Receiving messages"), "{}", html.body);
    for internal in ["already subscribed", "backfill", "needs_reauth", "poll"] {
        assert!(!html.body.contains(internal), "{internal}: {}", html.body);
    }
    assert!(
        !html.body.contains("<script"),
        "no script on the status page"
    );
    env.finish(&["1001"], &[PAGE_A], &["handmade.myshopify.com"])
        .await;
}

#[tokio::test]
async fn two_owners_with_different_pages_each_see_and_own_only_theirs() {
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::Local).await;
    env.graph.set_person("2001", &[PAGE_A]);
    env.graph.set_person("2002", &[PAGE_B]);
    let mut first = env.owner();
    let mut second = env.owner();
    first.install_shop("first.myshopify.com").await;
    second.install_shop("second.myshopify.com").await;
    first.connect_facebook(&env, "2001").await;
    second.connect_facebook(&env, "2002").await;
    let first_status = first.wait_onboarded(&[PAGE_A]).await;
    let second_status = second.wait_onboarded(&[PAGE_B]).await;
    assert_eq!(page_ids(&first_status), vec![PAGE_A]);
    assert_eq!(page_ids(&second_status), vec![PAGE_B]);
    assert_eq!(first_status["shop"], "first.myshopify.com");
    let (first_user, second_user) = (
        first_status["user_uuid"]
            .as_str()
            .expect("uuid")
            .to_string(),
        second_status["user_uuid"]
            .as_str()
            .expect("uuid")
            .to_string(),
    );
    assert_ne!(first_user, second_user);
    assert_eq!(
        env.keys_of(&first_user).await,
        vec![format!(
            "users/{first_user}/facebook_messenger/{PAGE_A}/page_data.json"
        )]
    );
    assert_eq!(
        env.keys_of(&second_user).await,
        vec![format!(
            "users/{second_user}/facebook_messenger/{PAGE_B}/page_data.json"
        )]
    );
    // A shop that installs again keeps its user UUID (its objects stay where they are).
    first.install_shop("first.myshopify.com").await;
    assert_eq!(user_of(&mut first).await, first_user);
    env.finish(
        &["2001", "2002"],
        &[PAGE_A, PAGE_B],
        &["first.myshopify.com", "second.myshopify.com"],
    )
    .await;
}

#[tokio::test]
async fn a_page_connected_by_another_owner_moves_to_them_with_its_token() {
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::S3 { endpoint: None }).await;
    env.graph.set_person("3001", &[PAGE_A, PAGE_B]);
    env.graph.set_person("3002", &[PAGE_B]);
    let mut first = env.owner();
    let mut second = env.owner();
    first.install_shop("old-owner.myshopify.com").await;
    first.connect_facebook(&env, "3001").await;
    first.wait_onboarded(&[PAGE_A, PAGE_B]).await;
    second.install_shop("new-owner.myshopify.com").await;
    second.connect_facebook(&env, "3002").await;
    let second_status = second.wait_onboarded(&[PAGE_B]).await;
    let second_user = second_status["user_uuid"]
        .as_str()
        .expect("uuid")
        .to_string();
    assert_eq!(page_ids(&first.status().await), vec![PAGE_A]);
    assert_eq!(page_ids(&second_status), vec![PAGE_B]);
    let listed = env.pages_list().await;
    let moved = listed
        .iter()
        .find(|p| p["page_id"] == PAGE_B)
        .expect("listed");
    assert_eq!(moved["user_uuid"], second_user.as_str());
    // The new owner's onboarding used the Page's token, opened under the Page's new row.
    assert_eq!(
        env.keys_of(&second_user).await,
        vec![format!(
            "users/{second_user}/facebook_messenger/{PAGE_B}/page_data.json"
        )]
    );
    env.finish(
        &["3001", "3002"],
        &[PAGE_A, PAGE_B],
        &["old-owner.myshopify.com", "new-owner.myshopify.com"],
    )
    .await;
}

#[tokio::test]
async fn every_page_of_a_paged_me_accounts_answer_is_connected() {
    let env = OwnerEnv::start(DbKind::Postgres, StoreKind::Local).await;
    let pages: Vec<String> = (0..5).map(|i| format!("71000000000000{i}")).collect();
    let page_refs: Vec<&str> = pages.iter().map(String::as_str).collect();
    env.graph.set_person("4001", &page_refs);
    env.graph.set_accounts_page_size(2);
    let mut owner = env.owner();
    owner.install_shop("many-pages.myshopify.com").await;
    owner.connect_facebook(&env, "4001").await;
    let status = owner.wait_onboarded(&page_refs).await;
    assert_eq!(page_ids(&status), pages);
    let accounts: Vec<_> = env
        .graph
        .login_requests()
        .into_iter()
        .filter(|(_, path, _)| path.ends_with("/me/accounts"))
        .collect();
    assert_eq!(accounts.len(), 3, "three pages of results: {accounts:?}");
    env.finish(&["4001"], &page_refs, &["many-pages.myshopify.com"])
        .await;
}

#[tokio::test]
async fn tampered_expired_replayed_and_missing_states_are_refused_with_400_and_a_reloaded_callback_goes_on_to_connect()
 {
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::Local).await;
    env.graph.set_person("5001", &[PAGE_A]);
    let mut owner = env.owner();
    let shop = "states.myshopify.com";

    // Tampered: a state whose content was changed keeps its old signature.
    let login = owner.get(&format!("/shopify/login?shop={shop}")).await;
    let location = reqwest::Url::parse(&login.location()).expect("url");
    let state = location
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .expect("state");
    let (encoded, signature) = state.split_once('.').expect("two parts");
    let mut altered = URL_SAFE_NO_PAD.decode(encoded).expect("base64");
    altered[0] ^= 1;
    let tampered = format!("{}.{signature}", URL_SAFE_NO_PAD.encode(altered));
    let params = |state: &str| {
        shopify_callback(&[
            ("code", "x"),
            ("shop", shop),
            ("state", state),
            ("timestamp", "1337178173"),
        ])
    };
    let answer = owner.get(&params(&tampered)).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(answer.body.contains("altered"), "{}", answer.body);

    // Expired: correctly signed, ten minutes and more old.
    let expired = forged_state(&owner, "shopify", shop, fbsync_shared::now_ms() - 1);
    let answer = owner.get(&params(&expired)).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(answer.body.contains("expired"), "{}", answer.body);

    // Missing.
    let answer = owner
        .get(&shopify_callback(&[
            ("code", "x"),
            ("shop", shop),
            ("timestamp", "1"),
        ]))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(answer.body.contains("incomplete"), "{}", answer.body);

    // Issued for another shop.
    let other = forged_state(
        &owner,
        "shopify",
        "other.myshopify.com",
        fbsync_shared::now_ms() + 60_000,
    );
    let answer = owner.get(&params(&other)).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(answer.body.contains("another shop"), "{}", answer.body);

    // Replayed: the install's own callback, a second time.
    let login = owner.get(&format!("/shopify/login?shop={shop}")).await;
    let authorize = owner.get(&login.location()).await;
    let callback = authorize.location();
    assert_eq!(owner.get(&callback).await.status, StatusCode::OK);
    // Reloaded in the signed-in browser: on to /connect, nothing done again.
    let reload = owner.get(&callback).await;
    assert_eq!(reload.status, StatusCode::SEE_OTHER, "{}", reload.body);
    assert_eq!(reload.location(), "/connect");
    assert!(reload.set_cookie().is_none(), "the session stays as it is");
    // The same link in this browser without a session: refused.
    let session = owner.cookies.remove("session_id").expect("a session");
    let replay = owner.get(&callback).await;
    assert_eq!(replay.status, StatusCode::BAD_REQUEST);
    assert!(replay.body.contains("already used"), "{}", replay.body);
    assert!(
        replay.body.contains("Start again"),
        "a way on: {}",
        replay.body
    );
    owner.cookies.insert("session_id".into(), session);

    // Facebook's side: a replayed callback, a Shopify state, and a login without a session.
    env.dialog
        .answer(DialogAnswer::Approve(env.graph.login_code("5001")));
    let login = owner.get("/facebook/login").await;
    let dialog = owner.get(&login.location()).await;
    let callback = dialog.location();
    assert_eq!(owner.get(&callback).await.status, StatusCode::SEE_OTHER);
    let reload = owner.get(&callback).await;
    assert_eq!(reload.status, StatusCode::SEE_OTHER, "{}", reload.body);
    assert_eq!(reload.location(), "/connect", "a reloaded callback goes on");
    assert!(reload.set_cookie().is_none(), "the session stays as it is");
    let foreign = forged_state(&owner, "shopify", shop, fbsync_shared::now_ms() + 60_000);
    let answer = owner
        .get(&format!("/facebook/callback?code=x&state={foreign}"))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(
        answer.body.contains("another step of the sign-in"),
        "{}",
        answer.body
    );
    let mut stranger = env.owner();
    let answer = stranger.get("/facebook/login").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(answer.body.contains("no session"), "{}", answer.body);
    // A state of one owner's login is refused in another's session (even in the browser it
    // was bound to).
    let user = user_of(&mut owner).await;
    let mut intruder = env.owner();
    intruder.install_shop("intruder.myshopify.com").await;
    intruder.get("/facebook/login").await;
    let theirs = forged_state(
        &intruder,
        "facebook",
        &user,
        fbsync_shared::now_ms() + 60_000,
    );
    let answer = intruder
        .get(&format!("/facebook/callback?code=x&state={theirs}"))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(answer.body.contains("another session"), "{}", answer.body);
    env.finish(&["5001"], &[PAGE_A], &[shop, "intruder.myshopify.com"])
        .await;
}

#[tokio::test]
async fn a_shopify_callback_with_a_bad_hmac_or_a_foreign_shop_is_refused_and_changes_nothing() {
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::Local).await;
    let mut owner = env.owner();
    let shop = "hmac.myshopify.com";
    let login = owner.get(&format!("/shopify/login?shop={shop}")).await;
    let authorize = owner.get(&login.location()).await;
    let callback = authorize.location();
    // One parameter changed after Shopify signed: the hmac no longer matches.
    let forged = callback.replace("timestamp=1337178173", "timestamp=1337178174");
    assert_ne!(forged, callback);
    let answer = owner.get(&forged).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(answer.body.contains("hmac"), "{}", answer.body);
    assert_eq!(
        answer.set_cookie(),
        None,
        "no session for a refused callback"
    );
    let stripped: String = callback
        .split('&')
        .filter(|pair| !pair.starts_with("hmac="))
        .collect::<Vec<_>>()
        .join("&");
    assert_eq!(owner.get(&stripped).await.status, StatusCode::BAD_REQUEST);
    // The genuine callback still works: the refused ones used nothing up.
    assert_eq!(owner.get(&callback).await.status, StatusCode::OK);

    // Shops outside *.myshopify.com are never contacted.
    for bad in [
        "evil.example.com",
        "shop.myshopify.com.evil.example",
        "-x.myshopify.com",
        "a%2Fb.myshopify.com",
        "",
    ] {
        let answer = owner.get(&format!("/shopify/login?shop={bad}")).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(answer.body.contains("myshopify.com"), "{}", answer.body);
        assert!(answer.headers.get(LOCATION).is_none());
    }
    assert_eq!(
        owner.get("/shopify/login").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(env.shopify.authorize_requests().len(), 1);
    env.finish(&[], &[], &[shop]).await;
}

#[tokio::test]
async fn a_cancelled_login_or_a_declined_permission_gets_a_page_that_says_what_is_missing() {
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::Local).await;
    env.graph.set_person("6001", &[PAGE_A]);
    let mut owner = env.owner();
    owner.install_shop("declines.myshopify.com").await;
    env.dialog.answer(DialogAnswer::Deny);
    let cancelled = owner.facebook_round_trip().await;
    assert_eq!(
        cancelled.status,
        StatusCode::BAD_REQUEST,
        "{}",
        cancelled.body
    );
    assert!(
        cancelled.body.contains("the login was cancelled"),
        "{}",
        cancelled.body
    );
    assert!(
        !cancelled.body.contains("Permissions error"),
        "Facebook's free text is not shown: {}",
        cancelled.body
    );
    assert!(
        cancelled.body.contains("pages_messaging"),
        "{}",
        cancelled.body
    );
    assert!(
        cancelled.body.contains("/facebook/login"),
        "a way to try again"
    );

    env.graph.decline("6001", "pages_messaging");
    let declined = owner.connect_facebook(&env, "6001").await;
    assert_eq!(
        declined.status,
        StatusCode::BAD_REQUEST,
        "{}",
        declined.body
    );
    assert!(declined.body.contains("not granted"), "{}", declined.body);
    assert!(
        declined.body.contains("pages_messaging"),
        "{}",
        declined.body
    );
    assert!(
        !declined.body.contains("pages_show_list"),
        "only what is missing"
    );
    assert!(
        page_ids(&owner.status().await).is_empty(),
        "nothing connected"
    );
    assert!(env.pages_list().await.is_empty());
    env.finish(&["6001"], &[PAGE_A], &["declines.myshopify.com"])
        .await;
}

/// The store sits behind the Spaces layer, which refuses (as Spaces does) a request carrying
/// the flexible checksum the SDK adds to `DeleteObjects`: a data deletion must delete without.
#[tokio::test]
async fn meta_deauthorize_and_data_deletion_callbacks_act_only_on_facebooks_signature() {
    let layer = SpacesLimitLayer::start(&s3_endpoint(), SpacesLimits::default()).await;
    let store = StoreKind::S3 {
        endpoint: Some(layer.endpoint()),
    };
    let env = OwnerEnv::start(DbKind::Sqlite, store).await;
    env.graph.set_person("7001", &[PAGE_A]);
    env.graph.set_person("7002", &[PAGE_B]);
    let mut owner = env.owner();
    let mut bystander = env.owner();
    owner.install_shop("leaves.myshopify.com").await;
    bystander.install_shop("stays.myshopify.com").await;
    owner.connect_facebook(&env, "7001").await;
    bystander.connect_facebook(&env, "7002").await;
    let user = owner.wait_onboarded(&[PAGE_A]).await["user_uuid"]
        .as_str()
        .expect("uuid")
        .to_string();
    let bystander_user = bystander.wait_onboarded(&[PAGE_B]).await["user_uuid"]
        .as_str()
        .expect("uuid")
        .to_string();

    // Badly signed: 400, nothing changes.
    let mut meta = env.owner();
    for bad in [
        signed_request("not-the-app-secret", "7001"),
        "garbage".to_string(),
        String::new(),
    ] {
        for path in ["/facebook/deauthorize", "/facebook/data-deletion"] {
            let answer = meta.post_form(path, &[("signed_request", &bad)]).await;
            assert_eq!(
                answer.status,
                StatusCode::BAD_REQUEST,
                "{path}: {}",
                answer.body
            );
        }
    }
    assert_eq!(env.pages_list().await.len(), 2);

    // Deauthorize: the person's Pages stop syncing, their tokens gone; others stay.
    let answer = meta
        .post_form(
            "/facebook/deauthorize",
            &[("signed_request", &signed_request(LOGIN_APP_SECRET, "7001"))],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let listed = env.pages_list().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["page_id"], PAGE_B);
    assert!(page_ids(&owner.status().await).is_empty());

    // They connect again, then ask for their data to be deleted.
    owner.connect_facebook(&env, "7001").await;
    owner.wait_onboarded(&[PAGE_A]).await;
    assert!(!env.keys_of(&user).await.is_empty());
    let answer = meta
        .post_form(
            "/facebook/data-deletion",
            &[("signed_request", &signed_request(LOGIN_APP_SECRET, "7001"))],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let confirmation: Value = serde_json::from_str(&answer.body).expect("json");
    let code = confirmation["confirmation_code"].as_str().expect("code");
    let url = confirmation["url"].as_str().expect("url");
    assert_eq!(
        url,
        format!("{}/facebook/data-deletion/status?code={code}", env.base)
    );
    // Sessions are gone at once.
    assert_eq!(owner.get("/connect").await.status, StatusCode::UNAUTHORIZED);
    let deadline = Instant::now() + ONBOARDING_LIMIT;
    let page = loop {
        let page = meta.get(url).await;
        if page.body.contains("Complete") {
            break page;
        }
        assert!(Instant::now() < deadline, "{}", page.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(page.body.contains("1 stored file(s)"), "{}", page.body);
    assert!(
        env.keys_of(&user).await.is_empty(),
        "the owner's objects are deleted"
    );
    let user_prefix = format!("/users/{user}/");
    assert_eq!(
        layer
            .deleted()
            .iter()
            .filter(|object| object.contains(&user_prefix))
            .count(),
        1,
        "one DELETE per object: {:?}",
        layer.deleted()
    );
    assert_eq!(
        layer.checksum_refusals(),
        0,
        "no request carried a checksum"
    );
    assert_eq!(
        env.keys_of(&bystander_user).await.len(),
        1,
        "another owner's objects stay"
    );
    assert_eq!(env.pages_list().await.len(), 1);
    assert_eq!(page_ids(&bystander.status().await), vec![PAGE_B]);
    assert_eq!(
        meta.get("/facebook/data-deletion/status?code=unknown")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // A person fbsync knows nothing of: the request is complete at once.
    let answer = meta
        .post_form(
            "/facebook/data-deletion",
            &[("signed_request", &signed_request(LOGIN_APP_SECRET, "7999"))],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let confirmation: Value = serde_json::from_str(&answer.body).expect("json");
    let (status, value) = meta
        .get_json(confirmation["url"].as_str().expect("url"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(value["status"], "complete");
    assert_eq!(value["objects_deleted"], 0);
    env.finish(
        &["7001", "7002"],
        &[PAGE_A, PAGE_B],
        &["leaves.myshopify.com", "stays.myshopify.com"],
    )
    .await;
}

#[tokio::test]
async fn a_token_refused_during_onboarding_shows_a_reconnect_link_and_reconnecting_heals_the_page()
{
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::Local).await;
    env.graph.set_person("8001", &[PAGE_A]);
    env.graph.push_failure(PAGE_A, Failure::TokenExpired);
    let mut owner = env.owner();
    owner.install_shop("reconnects.myshopify.com").await;
    owner.connect_facebook(&env, "8001").await;
    let deadline = Instant::now() + ONBOARDING_LIMIT;
    let page = loop {
        let status = owner.status().await;
        let page = status["pages"][0].clone();
        let failed = page["onboarding"]["subscribe"]
            .as_str()
            .is_some_and(|outcome| outcome.starts_with("failed:"));
        if page["status"] == "needs_reauth" && failed {
            break page;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(page["reconnect_url"], "/facebook/login");
    let error = page["last_error"].as_str().expect("last error in words");
    assert!(error.contains("reconnect"), "{error}");
    let subscribe = page["onboarding"]["subscribe"].as_str().expect("outcome");
    assert!(subscribe.starts_with("failed:"), "{subscribe}");
    let html = owner.get("/connect").await;
    assert!(
        html.body
            .contains("class=\"reconnect\" href=\"/facebook/login\""),
        "{}",
        html.body
    );
    // The job is dead-lettered from its own queue, so a replay onboards again.
    let letters = env.pipeline.dead_letters(&[], 1, ONBOARDING_LIMIT).await;
    assert_eq!(letters[0]["reason"], "token_error", "{letters:?}");
    assert_eq!(letters[0]["kind"], "onboard", "{letters:?}");

    // Reconnecting stores the token again and onboards the Page.
    owner.connect_facebook(&env, "8001").await;
    let status = owner.wait_onboarded(&[PAGE_A]).await;
    let page = &status["pages"][0];
    assert_eq!(page["status"], "active");
    assert_eq!(page["onboarding"]["subscribe"], "subscribed");
    assert_eq!(page["reconnect_url"], Value::Null);

    // Its conversations then count on the status page.
    let delivery = message_delivery(PAGE_A, "psid-1", "m_onboard_1", 1_700_000_000_000, false);
    assert_eq!(
        post_signed(
            &webhook_client(),
            &format!("{}/facebook/webhook", env.base),
            &delivery
        )
        .await,
        200
    );
    let deadline = Instant::now() + ONBOARDING_LIMIT;
    loop {
        let status = owner.status().await;
        let page = &status["pages"][0];
        if page["conversations_stored"] == 1 && page["last_event"].is_string() {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.finish(&["8001"], &[PAGE_A], &["reconnects.myshopify.com"])
        .await;
}

#[tokio::test]
async fn owner_routes_are_off_without_their_settings_and_half_a_configuration_is_refused() {
    let mut pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let client = reqwest::Client::new();
    for path in [
        "/connect",
        "/shopify/login?shop=a.myshopify.com",
        "/facebook/login",
    ] {
        let answer = client
            .get(format!("{}{path}", urls.public))
            .send()
            .await
            .expect("request");
        assert_eq!(answer.status(), StatusCode::NOT_FOUND, "{path}");
    }
    ingest.stop().await;

    pipeline.set("SHOPIFY_API_KEY", SHOPIFY_API_KEY);
    pipeline.set("STATE_TOKEN_SECRET", "short");
    let (code, _, stderr) = pipeline.run(&["ingest"]).await;
    assert_eq!(code, 2, "{stderr}");
    for missing in [
        "FACEBOOK_APP_ID is not set",
        "FACEBOOK_REDIRECT_URI is not set",
        "SHOPIFY_API_SECRET is not set",
        "SHOPIFY_REDIRECT_URI is not set",
        "STATE_TOKEN_SECRET must be at least 16 characters",
    ] {
        assert!(stderr.contains(missing), "{missing}: {stderr}");
    }
    pipeline.cleanup().await;
}
