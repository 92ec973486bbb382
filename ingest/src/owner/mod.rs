//! The owners' side of ingest: how a shop owner connects their Pages without an operator.
//!
//! Flow: `/shopify/login?shop=` → Shopify → `/shopify/callback` (session cookie, user UUID;
//! `/shopify/switch` when the browser was signed in to another shop) →
//! `/facebook/login` → Facebook's dialog → `/facebook/callback` (Page tokens sealed, one
//! onboarding job per Page queued) → `/connect` (the status page). Meta's callbacks
//! (`/facebook/deauthorize`, `/facebook/data-deletion`) undo it; `POST /logout` signs out.
//!
//! Invariants: no route here answers or logs a token (Shopify's, a user's or a Page's); every
//! state is signed, bound to its flow, its subject and the browser that started it, expires
//! and is used once; a session is a
//! random 256-bit id whose hash alone is stored; every input problem is a 4xx page in words,
//! never a 500, and every failure is an `error::OwnerError` (a page) or `error::CallbackError`
//! (Meta's JSON) the handler returns with `?`. The webhook path shares nothing with these routes but the listener: they are
//! served only when the owner settings are configured (see `Settings::owner_settings`).

pub mod browser_binding;
pub mod cookies;
pub mod error;
pub mod facebook_login;
pub mod meta_callbacks;
pub mod page;
pub mod page_card;
pub mod session;
pub mod shopify;
pub mod state;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use fbsync_shared::config::{FACEBOOK_CALLBACK_PATH, OwnerSettings, SHOPIFY_CALLBACK_PATH};
use fbsync_shared::crypto::TokenCipher;
use fbsync_shared::facebook::graph::GraphClient;
use fbsync_shared::jobs::Job;
use fbsync_shared::queue::{Publisher, Topology};
use fbsync_shared::storage::db::{Database, Outbox, Owners, Registry};

use self::error::OwnerError;

/// What the owner routes share.
pub struct OwnerState {
    /// The Shopify and Facebook apps, the state secret, the external URLs.
    pub settings: OwnerSettings,
    /// Users and their shops, sessions, used OAuth nonces, data-deletion requests.
    pub owners: Owners,
    /// The Pages owners connect, with their sealed tokens and onboarding steps. The owner
    /// routes hold no other part of the database: no claims, no stage, no budgets.
    pub registry: Registry,
    /// The jobs written with the changes they follow (onboarding, data deletion), until the
    /// broker has them.
    pub outbox: Outbox,
    /// Seals the shop and Page tokens.
    pub cipher: TokenCipher,
    /// Facebook Login's Graph calls.
    pub graph: GraphClient,
    /// Shopify's code exchange (timeouts set).
    pub http: reqwest::Client,
    /// Where onboarding and deletion jobs go.
    pub topology: Topology,
    /// The confirming publisher ingest already holds: the outbox's jobs are tried at once.
    pub publisher: Publisher,
    /// Longest wait for a job's confirm.
    pub publish_timeout: Duration,
    /// `scheme://host[:port]` of FACEBOOK_REDIRECT_URI: where the data-deletion status pages
    /// are, as Facebook shows them to people.
    pub public_origin: String,
}

impl OwnerState {
    pub fn new(
        settings: OwnerSettings,
        db: Database,
        cipher: TokenCipher,
        topology: Topology,
        publisher: Publisher,
        publish_timeout: Duration,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a plain HTTP client always builds");
        let public_origin = reqwest::Url::parse(&settings.facebook_redirect_uri)
            .map(|url| url.origin().ascii_serialization())
            .unwrap_or_default();
        Self {
            graph: GraphClient::new(&settings.graph_url),
            settings,
            owners: db.owners(),
            registry: db.registry(),
            outbox: db.outbox(),
            cipher,
            http,
            topology,
            publisher,
            publish_timeout,
            public_origin,
        }
    }
}

impl OwnerState {
    /// Uses a checked state's nonce. A state already used, opened again by a browser that is
    /// signed in (a reloaded or replayed callback), is no error: the answer is the way on,
    /// `/connect`, and nothing is done again.
    pub async fn use_state_once(
        &self,
        claims: &state::StateClaims,
        headers: &HeaderMap,
        now: i64,
    ) -> Result<Option<Response>, OwnerError> {
        match claims.use_once(&self.owners, now).await {
            Ok(()) => Ok(None),
            Err(state::StateError::Replayed)
                if session::current_user(self, headers).await?.is_some() =>
            {
                Ok(Some(Redirect::to("/connect").into_response()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Publishes jobs just written to the outbox (with confirms) and removes their rows: the
    /// owner's answer does not wait for a relay. When the broker is away they stay, and a
    /// worker's relay publishes them once it answers. True when all went now.
    pub async fn publish_now(&self, queued: Vec<(String, Job)>) -> bool {
        if queued.is_empty() {
            return true;
        }
        let (rows, outgoing): (Vec<String>, Vec<_>) = queued
            .into_iter()
            .map(|(row, job)| (row, self.topology.job(&job)))
            .unzip();
        match self
            .publisher
            .publish_all(&outgoing, self.publish_timeout)
            .await
        {
            Ok(()) => {
                if let Err(e) = self.outbox.sent(&rows).await {
                    // Published twice at worst: every outbox job is idempotent.
                    tracing::warn!(error = %e, "published jobs stay in the outbox");
                }
                true
            }
            Err(e) => {
                tracing::info!(error = %e, jobs = rows.len(), "the broker is away: the outbox relay publishes these jobs once it answers");
                false
            }
        }
    }
}

/// The owner routes.
pub fn router(state: Arc<OwnerState>) -> Router {
    Router::new()
        .route("/shopify/login", get(shopify::login))
        .route(SHOPIFY_CALLBACK_PATH, get(shopify::callback))
        .route("/shopify/switch", post(shopify::switch))
        .route("/logout", post(session::logout))
        .route("/facebook/login", get(facebook_login::login))
        .route(FACEBOOK_CALLBACK_PATH, get(facebook_login::callback))
        .route("/", get(status::start))
        .route(page::STYLESHEET_PATH, get(page::stylesheet))
        .route("/connect", get(status::connect))
        .route("/facebook/deauthorize", post(meta_callbacks::deauthorize))
        .route(
            "/facebook/data-deletion",
            post(meta_callbacks::data_deletion),
        )
        .route(
            "/facebook/data-deletion/status",
            get(status::deletion_status),
        )
        .with_state(state)
}
