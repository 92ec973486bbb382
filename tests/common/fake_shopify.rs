//! A fake Shopify on 127.0.0.1:0 for the connect flow, answering in the documented shapes
//! (SHOPIFY_ADMIN_URL = `http://ADDR/{shop}/admin`):
//! - `GET /{shop}/admin/oauth/authorize?client_id&scope&redirect_uri&state`: the owner approves
//!   at once; redirects to `redirect_uri` with `code`, `hmac`, `host`, `shop`, `state` and
//!   `timestamp`, `hmac` computed as Shopify does (the other parameters sorted, `k=v` joined by
//!   `&`, hex HMAC-SHA256 under the API secret);
//! - `POST /{shop}/admin/oauth/access_token` (JSON `client_id`, `client_secret`, `code`): the
//!   shop's token, for a code it handed out and the right credentials.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::task::JoinHandle;

/// The fake app's credentials.
pub const SHOPIFY_API_KEY: &str = "fake-shopify-api-key";
pub const SHOPIFY_API_SECRET: &str = "fake-shopify-api-secret";

/// The token the fake hands out for a shop; it must never be shown or stored in clear.
pub fn shop_token(shop: &str) -> String {
    format!("shpat_fake-shop-token-{shop}-must-never-be-shown")
}

/// The hex HMAC of Shopify's callback parameters as Shopify computes it (everything but
/// `hmac` and `signature`; `%` and `&` escaped in names and values, `=` in names; sorted by
/// name; joined by `&`).
pub fn shopify_hmac(secret: &str, params: &[(String, String)]) -> String {
    let escape = |text: &str| text.replace('%', "%25").replace('&', "%26");
    let mut pairs: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "hmac" && k != "signature")
        .map(|(k, v)| (escape(k).replace('=', "%3D"), escape(v)))
        .collect();
    pairs.sort();
    let message: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(message.join("&").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[derive(Default)]
struct ShopifyState {
    /// Codes handed out, by code: for which shop.
    codes: HashMap<String, String>,
    /// Every authorize request's query.
    authorize_requests: Vec<HashMap<String, String>>,
}

/// The running fake; it stops when dropped.
pub struct FakeShopify {
    addr: SocketAddr,
    state: Arc<Mutex<ShopifyState>>,
    server: JoinHandle<()>,
}

impl FakeShopify {
    pub async fn start() -> Self {
        let state: Arc<Mutex<ShopifyState>> = Arc::default();
        let app = axum::Router::new()
            .route(
                "/{shop}/admin/oauth/authorize",
                axum::routing::get(authorize),
            )
            .route(
                "/{shop}/admin/oauth/access_token",
                axum::routing::post(access_token),
            )
            .with_state(state.clone());
        let (addr, server) = super::serve_on_loopback(app).await;
        Self {
            addr,
            state,
            server,
        }
    }

    /// SHOPIFY_ADMIN_URL for this fake.
    pub fn admin_url(&self) -> String {
        format!("http://{}/{{shop}}/admin", self.addr)
    }

    /// Every authorize request's query so far.
    pub fn authorize_requests(&self) -> Vec<HashMap<String, String>> {
        self.state.lock().expect("lock").authorize_requests.clone()
    }
}

impl Drop for FakeShopify {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn authorize(
    State(state): State<Arc<Mutex<ShopifyState>>>,
    Path(shop): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let code = format!("shopify-code-{}", uuid::Uuid::new_v4().simple());
    {
        let mut state = state.lock().expect("lock");
        state.codes.insert(code.clone(), shop.clone());
        state.authorize_requests.push(query.clone());
    }
    if query.get("client_id").map(String::as_str) != Some(SHOPIFY_API_KEY) {
        return (StatusCode::BAD_REQUEST, "unknown client_id").into_response();
    }
    let mut params = vec![
        ("code".to_string(), code),
        (
            "host".to_string(),
            "YWRtaW4uc2hvcGlmeS5jb20vc3RvcmUvdGVzdA".to_string(),
        ),
        ("shop".to_string(), shop),
        (
            "state".to_string(),
            query.get("state").cloned().unwrap_or_default(),
        ),
        ("timestamp".to_string(), "1337178173".to_string()),
    ];
    let hmac = shopify_hmac(SHOPIFY_API_SECRET, &params);
    params.push(("hmac".to_string(), hmac));
    let Some(redirect) = query.get("redirect_uri") else {
        return (StatusCode::BAD_REQUEST, "no redirect_uri").into_response();
    };
    let mut url = reqwest::Url::parse(redirect).expect("redirect_uri is a URL");
    url.query_pairs_mut().extend_pairs(params);
    (StatusCode::FOUND, [(header::LOCATION, url.to_string())]).into_response()
}

async fn access_token(
    State(state): State<Arc<Mutex<ShopifyState>>>,
    Path(shop): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let field = |name: &str| body.get(name).and_then(Value::as_str).unwrap_or_default();
    let known = state
        .lock()
        .expect("lock")
        .codes
        .get(field("code"))
        .is_some_and(|code_shop| *code_shop == shop);
    if field("client_id") != SHOPIFY_API_KEY
        || field("client_secret") != SHOPIFY_API_SECRET
        || !known
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_request", "error_description": "The authorization code was not found or was already used"})),
        )
            .into_response();
    }
    Json(json!({"access_token": shop_token(&shop), "scope": "read_products"})).into_response()
}
